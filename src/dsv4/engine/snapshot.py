"""Copies of a sequence's attention state: rollback points and reusable prompt prefixes.

``capture`` copies everything a ``SequenceState`` holds (window rings, compressor buffers, the
stored entries) into plain tensors; ``restore`` writes such a copy into a state with freshly
allocated stores, so the restored sequence continues exactly like the original. A
``PrefixCache`` keeps captured prompt prefixes in memory and on disk; a file carries a SHA-256
of its payload and a fingerprint of the model that made it, and loading checks both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.model.kv_state import CompressorBuffer, LayerState, SequenceState

logger = logging.getLogger(__name__)

_MAGIC = b"DSV4SNAP1\n"


@dataclass
class LayerCopy:
    length: int
    window: torch.Tensor
    compressor: CompressorBuffer | None
    index_compressor: CompressorBuffer | None
    # Stored rows ([entries, head_dim] / [entries, index_head_dim]), or only the row count in
    # a rollback copy.
    compressed: torch.Tensor | int | None
    index_keys: torch.Tensor | int | None


@dataclass
class StateCopy:
    layers: list[LayerCopy]
    mtp: list[LayerCopy]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


def _copy_layer(layer: LayerState, with_entries: bool) -> LayerCopy:
    def entries(store):
        if store is None or not with_entries:
            return None
        return store.view(layer.window.dtype).clone()

    def buffer(b):
        return None if b is None else b.clone()

    return LayerCopy(layer.length, layer.window.clone(), buffer(layer.compressor),
                     buffer(layer.index_compressor), entries(layer.compressed), entries(layer.index_keys))


def capture(state: SequenceState, with_entries: bool = True, include_mtp: bool = True) -> StateCopy:
    """Copy a state. Without entries, the copy records only the store lengths (enough for a
    rollback, which truncates the stores instead of rewriting them)."""
    copies = [_copy_layer(layer, with_entries) for layer in state.layers]
    mtp = [_copy_layer(layer, with_entries) for layer in state.mtp] if include_mtp else []
    if not with_entries:
        for copy, layer in zip(copies, state.layers):
            copy.compressed = layer.compressed.length if layer.compressed is not None else None
            copy.index_keys = layer.index_keys.length if layer.index_keys is not None else None
    return StateCopy(copies, mtp)


def _restore_layer(layer: LayerState, copy: LayerCopy) -> None:
    layer.length = copy.length
    layer.window.copy_(copy.window)
    for name in ("compressor", "index_compressor"):
        saved = getattr(copy, name)
        setattr(layer, name, None if saved is None else saved.clone())
    for name in ("compressed", "index_keys"):
        store = getattr(layer, name)
        saved = getattr(copy, name)
        if store is None:
            continue
        if isinstance(saved, int):  # a rollback copy: drop rows appended after it
            store.truncate(saved)
        else:
            store.truncate(0)
            store.append(saved)


def restore(state: SequenceState, copy: StateCopy) -> None:
    """Overwrite ``state`` with ``copy`` (MTP layers too when the copy has them)."""
    for layer, saved in zip(state.layers, copy.layers):
        _restore_layer(layer, saved)
    for layer, saved in zip(state.mtp, copy.mtp):
        _restore_layer(layer, saved)


def model_fingerprint(model) -> str:
    """SHA-256 over the config, numerics, dtype and every weight's name, shape, dtype and
    first and last 64 bytes: cheap on large checkpoints, different for different weights."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    digest.update(f"{model.numerics!r} {model.dtype}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
        digest.update(raw[:64].cpu().numpy().tobytes())
        digest.update(raw[-64:].cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Prefix:
    token_ids: tuple[int, ...]
    state: StateCopy


class PrefixCache:
    """Captured prompt prefixes, looked up by the longest one that starts a new prompt."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self._prefixes: dict[tuple[int, ...], Prefix] = {}

    def __len__(self) -> int:
        return len(self._prefixes)

    def add(self, token_ids, state: SequenceState) -> Prefix:
        ids = tuple(int(t) for t in token_ids)
        if state.length != len(ids):
            raise ValueError(f"state length {state.length} does not match the prefix length {len(ids)}")
        prefix = Prefix(ids, capture(state))
        self._prefixes[ids] = prefix
        return prefix

    def longest_match(self, prompt: list[int]) -> Prefix | None:
        """Return the longest stored prefix shorter than ``prompt`` that equals its start.

        Shorter, because the last prompt token must still run to produce the first logits.
        """
        best = None
        for ids, prefix in self._prefixes.items():
            if len(ids) < len(prompt) and tuple(prompt[: len(ids)]) == ids:
                if best is None or len(ids) > len(best.token_ids):
                    best = prefix
        return best

    # ------------------------------------------------------------------ disk

    def save(self, prefix: Prefix, path: str | Path) -> None:
        payload = io.BytesIO()
        tensors = _flatten(prefix.state)
        tensors["token_ids"] = torch.tensor(prefix.token_ids, dtype=torch.long)
        torch.save(tensors, payload)
        body = payload.getvalue()
        header = {"fingerprint": self.fingerprint, "sha256": hashlib.sha256(body).hexdigest(),
                  "tokens": len(prefix.token_ids)}
        Path(path).write_bytes(_MAGIC + json.dumps(header).encode() + b"\n" + body)
        logger.info("saved a %d-token prefix snapshot to %s", len(prefix.token_ids), path)

    def load(self, path: str | Path) -> Prefix:
        """Read a snapshot file, check it, and add it to this cache."""
        raw = Path(path).read_bytes()
        if not raw.startswith(_MAGIC):
            raise ValueError(f"{path} is not a dsv4 prefix snapshot (missing header)")
        header_line, _, body = raw[len(_MAGIC):].partition(b"\n")
        header = json.loads(header_line)
        if header["fingerprint"] != self.fingerprint:
            raise ValueError(f"snapshot {path} was made by another model or config (fingerprint "
                             f"{header['fingerprint'][:12]}, this model {self.fingerprint[:12]}); "
                             f"recreate it with this model")
        actual = hashlib.sha256(body).hexdigest()
        if actual != header["sha256"]:
            raise ValueError(f"snapshot {path} is corrupt: SHA-256 {actual[:12]} does not match "
                             f"the recorded {header['sha256'][:12]}; recreate it")
        tensors = torch.load(io.BytesIO(body), weights_only=True)
        ids = tuple(int(t) for t in tensors.pop("token_ids"))
        prefix = Prefix(ids, _unflatten(tensors))
        self._prefixes[prefix.token_ids] = prefix
        return prefix


_BUFFER_FIELDS = ("kv", "score", "prev_kv", "prev_score")


def _flatten(copy: StateCopy) -> dict[str, torch.Tensor]:
    """Convert a state copy to named tensors, so that files load with ``weights_only=True``."""
    out: dict[str, torch.Tensor] = {}
    for group, layers in (("layers", copy.layers), ("mtp", copy.mtp)):
        for i, layer in enumerate(layers):
            prefix = f"{group}.{i}."
            out[prefix + "length"] = torch.tensor(layer.length)
            out[prefix + "window"] = layer.window
            for name in ("compressor", "index_compressor"):
                buffer = getattr(layer, name)
                if buffer is None:
                    continue
                for field_name in _BUFFER_FIELDS:
                    value = getattr(buffer, field_name)
                    if value is not None:
                        out[f"{prefix}{name}.{field_name}"] = value
            for name in ("compressed", "index_keys"):
                if isinstance(getattr(layer, name), torch.Tensor):
                    out[prefix + name] = getattr(layer, name)
    return out


def _unflatten(tensors: dict[str, torch.Tensor]) -> StateCopy:
    groups: dict[str, list[LayerCopy]] = {"layers": [], "mtp": []}
    for group in groups:
        i = 0
        while f"{group}.{i}.length" in tensors:
            prefix = f"{group}.{i}."
            buffers = {}
            for name in ("compressor", "index_compressor"):
                if f"{prefix}{name}.kv" in tensors:
                    buffers[name] = CompressorBuffer(
                        *(tensors.get(f"{prefix}{name}.{f}") for f in _BUFFER_FIELDS))
            groups[group].append(LayerCopy(
                int(tensors[prefix + "length"]), tensors[prefix + "window"],
                buffers.get("compressor"), buffers.get("index_compressor"),
                tensors.get(prefix + "compressed"), tensors.get(prefix + "index_keys")))
            i += 1
    return StateCopy(groups["layers"], groups["mtp"])
