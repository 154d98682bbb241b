"""Lazy, validated access to a DeepSeek-V4 checkpoint directory.

A checkpoint directory contains ``config.json`` and either ``model.safetensors.index.json`` with
its shards or a single ``model.safetensors``. Shards are memory-mapped: ``tensor(name)`` returns
the stored tensor (FP8, packed FP4 and UE8M0 scales stay as stored) as a view of the mapping,
and nothing is converted to bf16. Only scale tensors are read at once, to reject NaN bytes.
Tensor names may be DeepSeek's official names or those of transformers'
``DeepseekV4ForCausalLM`` (loaded or saved), and the reader always takes official names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.config import ModelConfig

from . import hf_names
from .layout import SCALE_SUFFIX, TensorSpec, expected_tensors
from .quant import UE8M0_NAN, dequantize_fp4, dequantize_fp8_blocks
from .safetensors_io import SafetensorsError, SafetensorsFile, dtype_label

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_LISTED_PROBLEMS = 12
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names tensor, file and fix."""


def describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """Format a dtype and shape as ``F8_E4M3[128, 256]``."""
    return f"{dtype_label(dtype)}{list(shape)}"


def _check_scale_bytes(scale: torch.Tensor, name: str, path: Path) -> None:
    invalid = int((scale.view(torch.uint8) == UE8M0_NAN).sum())
    if invalid:
        raise CheckpointError(
            f"scale tensor {name!r} in {path} contains {invalid} NaN byte(s) (255); a UE8M0 "
            "scale byte b means 2**(b - 127) and must be 0..254. The shard is corrupt: "
            "re-download or rewrite it")


@dataclass(frozen=True)
class _Source:
    """Storage location of an official tensor: file, stored name and an optional slice."""

    file: str
    stored: str
    # For transformers' stacked experts: the expert index and which part of it ("w1", "w2",
    # "w3"). None for a tensor stored under its own name.
    expert: int | None = None
    part: str | None = None


class CheckpointReader:
    """Read a checkpoint directory lazily; ``validate()`` checks it against its config.

    With ``check_scales`` (the default) every UE8M0 scale tensor is scanned for NaN bytes
    when ``tensor()`` returns it, which reads the scales (about 1/16 of the FP4 expert bytes)
    from disk. Pass False to keep ``tensor()`` free of any disk reads.
    """

    def __init__(self, path: str | Path, *, check_scales: bool = True) -> None:
        self.path = Path(path)
        self.check_scales = check_scales
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = self._read_config()
        weight_map = self._read_weight_map()
        self._files = self._open_files(weight_map)
        self.naming = ("transformers" if any(hf_names.is_transformers_name(n) for n in weight_map)
                       else "official")
        self._sources: dict[str, _Source] = {}
        self._unknown: dict[str, str] = {}  # stored name without an official name -> file
        for stored, file_name in weight_map.items():
            self._add_source(stored, file_name)
        if self.naming == "transformers" and not any(n.startswith("mtp.") for n in self._sources):
            # transformers has no MTP block, so its exports carry none: describe what is there.
            self.config = self.config.replace(num_nextn_predict_layers=0,
                                              compress_ratios=self.config.layer_ratios)

    # ------------------------------------------------------------------ opening

    def _read_config(self) -> ModelConfig:
        """Load ``config.json`` in the released naming or in transformers' naming."""
        path = self.path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raw = None  # ModelConfig.from_file raises the error that names the problem
        if hf_names.is_transformers_config(raw):
            return hf_names.config_from_transformers(raw, source=str(path))
        return ModelConfig.from_file(path)

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text())
            except json.JSONDecodeError as error:
                raise CheckpointError(f"{index_path}: not valid JSON ({error})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: missing or invalid 'weight_map' object "
                                      "(tensor name -> shard file name)")
            return weight_map
        single = self.path / SINGLE_FILE
        if single.exists():
            return {name: SINGLE_FILE for name in self._open_file(SINGLE_FILE).entries}
        raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found; "
                              "is this a safetensors checkpoint directory?")

    def _open_file(self, file_name: str) -> SafetensorsFile:
        try:
            return SafetensorsFile(self.path / file_name)
        except SafetensorsError as error:
            raise CheckpointError(str(error)) from None

    def _open_files(self, weight_map: dict[str, str]) -> dict[str, SafetensorsFile]:
        files: dict[str, SafetensorsFile] = {}
        for stored, file_name in weight_map.items():
            if file_name not in files:
                if not (self.path / file_name).is_file():
                    raise CheckpointError(
                        f"{self.path / INDEX_FILE} maps tensor {stored!r} to shard "
                        f"{file_name!r}, which does not exist in {self.path}; the download "
                        "is incomplete")
                files[file_name] = self._open_file(file_name)
            if stored not in files[file_name]:
                raise CheckpointError(
                    f"{self.path / INDEX_FILE} maps tensor {stored!r} to {file_name}, but that "
                    "file does not contain it; the index and the shards do not match")
        return files

    def _add_source(self, stored: str, file_name: str) -> None:
        if self.naming == "official":
            self._sources[stored] = _Source(file_name, stored)
            return
        stacked = hf_names.split_stacked_name(stored)
        if stacked is not None:
            layer, kind = stacked
            parts = ("w1", "w3") if kind == "gate_up_proj" else ("w2",)
            experts = self._files[file_name].entries[stored].shape[0]
            for expert in range(experts):
                for part in parts:
                    name = f"layers.{layer}.ffn.experts.{expert}.{part}.weight"
                    self._sources[name] = _Source(file_name, stored, expert, part)
            return
        try:
            self._sources[hf_names.transformers_to_official(stored)] = _Source(file_name, stored)
        except KeyError:
            self._unknown[stored] = file_name

    # ------------------------------------------------------------------ access

    def names(self) -> list[str]:
        """Return the official names of all stored tensors."""
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def file_of(self, name: str) -> str:
        return self._source(name).file

    def _source(self, name: str) -> _Source:
        source = self._sources.get(name)
        if source is None:
            raise CheckpointError(f"tensor {name!r} not found in checkpoint {self.path}")
        return source

    def tensor(self, name: str) -> torch.Tensor:
        """Return official tensor ``name`` as stored (a view of the memory-mapped shard).

        With ``check_scales``, a UE8M0 scale tensor that contains a NaN byte (255) raises
        CheckpointError naming the tensor and its file.
        """
        source = self._source(name)
        stored = self._files[source.file].tensor(source.stored)
        if self.check_scales and stored.dtype == torch.float8_e8m0fnu:
            _check_scale_bytes(stored, name, self.path / source.file)
        if source.expert is None:
            return stored
        expert = stored[source.expert]
        if source.part == "w2":
            return expert  # down_proj [E, d, I] -> [d, I]
        width = expert.shape[0] // 2  # gate_up_proj [E, 2I, d]: w1 rows, then w3 rows
        return expert[:width] if source.part == "w1" else expert[width:]

    def stored_spec(self, name: str) -> TensorSpec:
        """Return the stored shape and dtype of ``name`` without reading its data."""
        source = self._source(name)
        entry = self._files[source.file].entries[source.stored]
        shape = entry.shape
        if source.expert is not None:
            shape = shape[1:]
            if source.part != "w2":
                shape = (shape[0] // 2, *shape[1:])
        return TensorSpec(shape, entry.dtype)

    def dequantized(self, weight_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return a weight in ``dtype``, decoding FP8 or FP4 storage with its ``.scale``."""
        weight = self.tensor(weight_name)
        if weight.dtype not in (torch.float8_e4m3fn, torch.int8):
            return weight.to(dtype)
        scale_name = weight_name.removesuffix(".weight") + SCALE_SUFFIX
        scale = self.tensor(scale_name)
        if weight.dtype == torch.float8_e4m3fn:
            return dequantize_fp8_blocks(weight, scale, dtype, name=scale_name)
        return dequantize_fp4(weight, scale, dtype, name=scale_name)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every tensor against ``expected_tensors(config)``; raise CheckpointError if not.

        The error lists each missing, unexpected, mis-shaped or mis-typed tensor with its file
        and the expected and stored shape/dtype. With transformers names, scale tensors are
        not expected and float tensors may be stored in any of fp32, bf16 or fp16, because
        transformers keeps weights dequantized. Its exports have no MTP block, so the reader's
        config then has ``num_nextn_predict_layers = 0``.
        """
        expected = expected_tensors(self.config)
        if self.naming == "transformers":
            expected = {name: spec for name, spec in expected.items()
                        if not name.endswith(SCALE_SUFFIX)}
        problems: list[str] = []
        for name, spec in expected.items():
            if name in self._sources:
                problem = self._check_spec(name, spec)
            else:
                problem = self._describe_missing(name, spec)
            if problem:
                problems.append(problem)
        for name in self._sources:
            if name not in expected:
                problems.append(self._describe_unexpected(name, expected))
        for stored, file_name in self._unknown.items():
            problems.append(f"unexpected tensor {stored!r} in {file_name}: not a DeepSeek-V4 "
                            "tensor name (official or transformers)")
        if problems:
            listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
            more = len(problems) - _MAX_LISTED_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise CheckpointError(
                f"checkpoint {self.path} does not match its config.json "
                f"({len(problems)} problem(s)):\n  {listed}{tail}")
        logger.debug("validated %d tensors in %s", len(expected), self.path)

    def _check_spec(self, name: str, spec: TensorSpec) -> str | None:
        stored = self.stored_spec(name)
        dtype_ok = stored.dtype == spec.dtype or (
            self.naming == "transformers" and spec.dtype in _FLOAT_DTYPES
            and stored.dtype in _FLOAT_DTYPES)
        if stored.shape == spec.shape and dtype_ok:
            return None
        wrong = "shape" if stored.shape != spec.shape else "dtype"
        if stored.shape != spec.shape and not dtype_ok:
            wrong = "shape and dtype"
        return (f"tensor {name!r} in {self.file_of(name)} has the wrong {wrong}: expected "
                f"{describe(spec.dtype, spec.shape)}, found {describe(stored.dtype, stored.shape)}")

    def _describe_missing(self, name: str, spec: TensorSpec) -> str:
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + ".weight"
            if weight in self._sources:
                return (f"quantized weight {weight!r} in {self.file_of(weight)} has no scale "
                        f"tensor {name!r} (expected {describe(spec.dtype, spec.shape)})")
        return (f"missing tensor {name!r}: expected {describe(spec.dtype, spec.shape)}, "
                f"found in no shard of {self.path}")

    def _describe_unexpected(self, name: str, expected: dict[str, TensorSpec]) -> str:
        stored = self.stored_spec(name)
        found = describe(stored.dtype, stored.shape)
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + ".weight"
            weight_spec = expected.get(weight)
            if weight_spec is not None and weight_spec.dtype in _FLOAT_DTYPES:
                return (f"unexpected scale tensor {name!r} ({found}) in {self.file_of(name)}: "
                        f"weight {weight!r} is {dtype_label(weight_spec.dtype)} and takes no "
                        "scale (check weight_dtype/expert_dtype in config.json)")
        return f"unexpected tensor {name!r} ({found}) in {self.file_of(name)}"
