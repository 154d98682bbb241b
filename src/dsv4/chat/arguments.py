"""Typing of DSML parameter values and assembly of one call's JSON arguments string."""

from __future__ import annotations

import json
from typing import Any

from dsv4.chat.dsml import to_json

# Lone parameters that models wrap the real arguments object in.
_WRAPPER_KEYS = ("arguments", "input")


class InvokeRejected(Exception):
    """Raised when the invoke being parsed cannot become a call; the message gives the reason."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_value(text: str) -> Any:
    """Parse a ``string="false"`` value; raise ValueError when it is not strict JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def _escape(text: str) -> str:
    """JSON-escape `text` without quotes; escaping pieces and joining equals escaping the whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class ArgumentsBuilder:
    """Turns the parameters of one invoke into argument deltas and the final arguments string.

    `schema` is the tool's JSON Schema for its parameters, or None when tools are unknown.
    String values stream as they arrive; other values are emitted once their closing tag
    confirms they are valid JSON.
    """

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self._schema = schema
        self._properties: dict[str, Any] = (schema or {}).get("properties") or {}
        self._emitted: list[str] = []
        self._keys: set[str] = set()
        self._key: str | None = None
        self._kind = ""  # "string", "json" or "untyped" for the open parameter
        self._value: list[str] = []
        self._deferred: tuple[str, dict[str, Any]] | None = None
        self.warnings: list[tuple[str, str]] = []

    def _emit(self, text: str) -> list[str]:
        self._emitted.append(text)
        return [text]

    def _separator(self) -> str:
        return ", " if self._emitted else "{"

    def _schema_type(self, key: str) -> Any:
        return (self._properties.get(key) or {}).get("type")

    def _flush_deferred(self) -> list[str]:
        if self._deferred is None:
            return []
        key, value = self._deferred
        self._deferred = None
        return self._emit(f"{self._separator()}{to_json(key)}: {to_json(value)}")

    def open_param(self, key: str, string_attribute: str | None) -> list[str]:
        """Start parameter `key`; return argument deltas to emit now."""
        if key in self._keys:
            raise InvokeRejected(f"duplicate parameter {key!r}")
        if string_attribute not in (None, "true", "false"):
            raise InvokeRejected(
                f'parameter {key!r} has string="{string_attribute}", expected "true" or "false"')
        self._keys.add(key)
        self._key = key
        self._value = []
        deltas = self._flush_deferred()
        if string_attribute == "true":
            self._kind = "string"
            deltas += self._emit(f'{self._separator()}{to_json(key)}: "')
        else:
            self._kind = "json" if string_attribute == "false" else "untyped"
        return deltas

    def add_value(self, text: str) -> list[str]:
        """Add value text of the open parameter; return deltas (only string values stream)."""
        if self._kind == "string":
            return self._emit(_escape(text)) if text else []
        self._value.append(text)
        return []

    def close_param(self) -> list[str]:
        """Finish the open parameter; raise InvokeRejected when its value cannot be typed."""
        key, kind, text = self._key, self._kind, "".join(self._value)
        assert key is not None, "close_param without open_param"
        self._key = None
        if kind == "string":
            return self._emit('"')

        schema_type = self._schema_type(key)
        try:
            value: Any = parse_json_value(text)
        except ValueError:
            if schema_type != "string":
                raise InvokeRejected(
                    f"parameter {key!r}: value {text!r} is not valid JSON and the schema does "
                    f"not declare it a string") from None
            value = text
            self.warnings.append((f"parameter {key!r}: kept a non-JSON value as a string "
                                  f"because the schema declares a string", text))
        else:
            if kind == "untyped":
                if schema_type == "string":
                    value = text
                elif self._schema is None or key not in self._properties:
                    raise InvokeRejected(
                        f"parameter {key!r} has no string attribute and no schema to type it")
                self.warnings.append((f"parameter {key!r}: missing string attribute, typed "
                                      f"from the tool schema", text))

        if (not self._emitted and key in _WRAPPER_KEYS and key not in self._properties
                and isinstance(value, dict) and self._properties
                and set(value) <= set(self._properties)):
            # Possibly the model wrapped the real arguments; decided when the invoke ends.
            self._deferred = (key, value)
            return []
        return self._emit(f"{self._separator()}{to_json(key)}: {to_json(value)}")

    def finish(self) -> tuple[list[str], str]:
        """Close the arguments object; return (last deltas, whole arguments string)."""
        if self._key is not None:
            raise InvokeRejected(f"parameter {self._key!r} is not closed")
        if self._deferred is not None and not self._emitted:
            key, value = self._deferred
            self._deferred = None
            self.warnings.append((f"unwrapped the lone parameter {key!r} into the arguments",
                                  to_json(value)))
            deltas = self._emit(to_json(value))
        else:
            deltas = self._flush_deferred()
            deltas += self._emit("}" if self._emitted else "{}")
        return deltas, "".join(self._emitted)
