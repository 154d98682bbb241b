"""Write random-initialized DeepSeek-V4 checkpoints in the released safetensors layout.

The output directory gets ``config.json`` (Hugging Face naming), shards named
``model-0000X-of-0000N.safetensors`` and ``model.safetensors.index.json``, with every tensor in
its released dtype (FP8 e4m3 + UE8M0 block scales, packed FP4 experts + UE8M0 group scales,
bf16, fp32, int64). Tensors are made and written one at a time, so memory stays near the size of
the largest tensor (the 129,280 x 4096 bf16 embedding, 1 GiB, for Flash) whatever the
checkpoint size. The same config and seed give the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.config import ModelConfig, load_preset

from .checkpoint import INDEX_FILE
from .layout import SCALE_SUFFIX, TensorSpec, expected_tensors
from .random_weights import random_tensors
from .safetensors_io import StreamingWriter

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 4 * 1024 ** 3
CACHE_ENV = "DSV4_CACHE_DIR"
TINY_PRESET = "tiny"
TINY_SEED = 0


def cut_config(config: ModelConfig, num_layers: int | None = None,
               num_experts: int | None = None) -> ModelConfig:
    """Return ``config`` with only its first ``num_layers`` layers and ``num_experts`` experts.

    The MTP entries of ``compress_ratios`` are kept; ``num_hash_layers`` and
    ``num_experts_per_tok`` are clamped to the new counts.
    """
    changes: dict[str, object] = {}
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"--layers must be between 1 and num_hidden_layers="
                             f"{config.num_hidden_layers}, got {num_layers}")
        changes["num_hidden_layers"] = num_layers
        changes["compress_ratios"] = config.layer_ratios[:num_layers] + config.mtp_ratios
        changes["num_hash_layers"] = min(config.num_hash_layers, num_layers)
    if num_experts is not None:
        if not 1 <= num_experts <= config.n_routed_experts:
            raise ValueError(f"--experts must be between 1 and n_routed_experts="
                             f"{config.n_routed_experts}, got {num_experts}")
        changes["n_routed_experts"] = num_experts
        changes["num_experts_per_tok"] = min(config.num_experts_per_tok, num_experts)
    return config.replace(**changes) if changes else config


def _units(specs: dict[str, TensorSpec]) -> list[list[str]]:
    """Group each quantized weight with its ``.scale`` so both land in the same shard."""
    units: list[list[str]] = []
    for name in specs:
        if name.endswith(SCALE_SUFFIX):
            continue
        unit = [name]
        scale = name.removesuffix(".weight") + SCALE_SUFFIX
        if name.endswith(".weight") and scale in specs:
            unit.append(scale)
        units.append(unit)
    return units


def plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors into shards of at most ``max_shard_bytes`` (a larger unit gets its own).

    Inside a shard tensors are ordered by element size, largest first, so every tensor starts
    aligned to its element size. A weight and its scale (both 1-byte) stay adjacent.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for unit in _units(specs):
        unit_bytes = sum(specs[name].nbytes for name in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return [sorted(shard, key=lambda n: -specs[n].dtype.itemsize) for shard in shards]


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_random_checkpoint(config: ModelConfig, out_dir: str | Path, *, seed: int = 0,
                            num_layers: int | None = None, num_experts: int | None = None,
                            progress: bool = True,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random checkpoint of ``config`` (cut by ``num_layers``/``num_experts``) to ``out_dir``.

    ``out_dir`` must be missing or empty. Returns ``out_dir``.
    """
    out = Path(out_dir)
    config = cut_config(config, num_layers, num_experts)
    specs = expected_tensors(config)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty; choose a new or empty "
                              "directory")
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    total = sum(spec.nbytes for spec in specs.values())
    logger.info("writing %d tensors (%.2f GiB) in %d shard(s) to %s", len(specs),
                total / 1024 ** 3, len(shards), out)

    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
              desc="init-checkpoint", disable=not progress) as bar:
        for index, shard in enumerate(shards):
            file_name = shard_file_name(index, len(shards))
            _write_shard(out / file_name, shard, specs, config, seed, bar)
            weight_map.update({name: file_name for name in shard})
    # The index lists names in layout order (as the released index does, by layer).
    index_data = {"metadata": {"total_size": total},
                  "weight_map": {name: weight_map[name] for name in specs}}
    (out / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    return out


def _write_shard(path: Path, names: list[str], specs: dict[str, TensorSpec],
                 config: ModelConfig, seed: int, bar: tqdm) -> None:
    writer = StreamingWriter(path, [(n, specs[n].shape, specs[n].dtype) for n in names])
    pending: dict[str, torch.Tensor] = {}  # a generated scale waiting for its turn
    try:
        for name in names:
            if name in pending:
                tensor = pending.pop(name)
            else:
                scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
                generated = random_tensors(name, specs[name], specs.get(scale_name), seed, config)
                tensor = generated.pop(name)
                pending.update(generated)
            writer.write(name, tensor)
            bar.update(specs[name].nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def default_cache_dir() -> Path:
    """Return ``$DSV4_CACHE_DIR/tiny`` or ``~/.cache/dsv4/tiny``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "dsv4"
    return base / TINY_PRESET


def ensure_tiny_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Return the ``tiny`` preset's checkpoint (seed 0), writing it on first use.

    The checkpoint is written to a temporary directory beside the target and renamed into
    place, so a reader never sees a half-written checkpoint and two concurrent first uses
    both end with one complete copy.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / INDEX_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("creating the tiny demo checkpoint in %s (first use)", target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_random_checkpoint(load_preset(TINY_PRESET), staging, seed=TINY_SEED,
                                progress=False)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first (target exists and is not empty).
            if not (target / INDEX_FILE).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
