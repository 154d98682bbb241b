"""dsv4: run and build on DeepSeek-V4 models on your own hardware.

Subpackages, with one-way dependencies: ``model`` (math, checkpoints, quantization), ``engine``
(cache, scheduler, sampler, runner), ``chat`` (tokenizer, encoder, parser), ``server``
(OpenAI-compatible HTTP), ``sandbox`` (DSec-style execution layers and replay), ``agent``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: Any, numerics: str = "reference", dtype: Any = None, device: Any = "cpu"):
    """Load a DeepSeek-V4 checkpoint directory (or ``"tiny"``) as a ``torch.nn.Module``.

    Imported lazily so that ``import dsv4`` stays cheap for the chat and sandbox parts.
    """
    from dsv4.model.loading import load_model as _load_model

    return _load_model(path, numerics=numerics, dtype=dtype, device=device)
