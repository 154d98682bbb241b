"""Model configuration: the ``ModelConfig`` dataclass and the named presets."""

from dsv4.config.model_config import ConfigError, ModelConfig, RopeScaling
from dsv4.config.presets import load_preset, preset_names, resolve_config

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "load_preset", "preset_names", "resolve_config"]
