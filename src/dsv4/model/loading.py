"""Build a Transformer and fill it from a checkpoint without copying its weights.

The model is built on the meta device, then every parameter and buffer is replaced by the
checkpoint's own tensor: on the CPU a view of the memory-mapped file in its stored format (FP8,
packed FP4, bf16, ...), so loading reads nothing until a forward touches a weight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.transformer import Transformer

logger = logging.getLogger(__name__)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """Activation dtype when none is given: float32 on the CPU, bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def build_from_tensors(config: ModelConfig, get_tensor: Callable[[str], torch.Tensor], *,
                       numerics: str = "reference", dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", progress: bool = False) -> Transformer:
    """A Transformer whose every state entry is ``get_tensor(name)`` (official names)."""
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config, numerics=numerics, dtype=dtype)
    names = list(model.state_dict().keys())
    iterator: Any = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="loading weights", unit="tensor", leave=False)
    for name in iterator:
        _assign(model, name, get_tensor(name).to(device))
    model.eval()
    return model


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, leaf)
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name}: the model expects shape {tuple(current.shape)}, "
                         f"the checkpoint has {tuple(tensor.shape)}")
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_model(path: str | Path, numerics: str = "reference", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool = False) -> Transformer:
    """Load a checkpoint directory in the released layout, or ``"tiny"`` (created on first use).

    The checkpoint is validated first: a missing, unexpected, mis-shaped or mis-typed tensor,
    or a truncated shard, raises an error naming the tensor and the file.
    """
    from dsv4.model.checkpoint import CheckpointReader

    if str(path) == "tiny":
        from dsv4.model.writer import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint()
    reader = CheckpointReader(path)
    reader.validate()
    logger.info("loading %s (%d layers, numerics=%s, device=%s)", path,
                reader.config.num_hidden_layers, numerics, device)
    return build_from_tensors(reader.config, reader.tensor, numerics=numerics, dtype=dtype,
                              device=device, progress=progress)
