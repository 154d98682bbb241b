import json
from pathlib import Path

import pytest

from dsv4.config import ConfigError, ModelConfig, load_preset

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "configs"


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_both_namings_give_equal_configs(name):
    hf = ModelConfig.from_file(CONFIGS / f"deepseek-v4-{name}.config.json")
    official = ModelConfig.from_file(CONFIGS / f"deepseek-v4-{name}.inference-config.json")
    assert hf == official
    assert hf == load_preset(name)


def test_flash_values():
    config = load_preset("flash")
    assert config.hidden_size == 4096
    assert config.compress_rope_theta == 160000.0
    assert config.layer_ratios[:4] == (0, 0, 4, 128)
    assert config.mtp_ratios == (0,)
    assert config.expert_dtype == "fp4"
    assert config.weight_dtype == "fp8"


def test_missing_keys_are_named():
    raw = json.loads((CONFIGS / "deepseek-v4-flash.config.json").read_text())
    del raw["hidden_size"]
    del raw["index_topk"]
    with pytest.raises(ConfigError, match=r"missing config keys \['hidden_size', 'index_topk'\]"):
        ModelConfig.from_dict(raw)


def test_unknown_key_is_named():
    raw = json.loads((CONFIGS / "deepseek-v4-flash.inference-config.json").read_text())
    raw["dimm"] = 4096
    with pytest.raises(ConfigError, match="dimm"):
        ModelConfig.from_dict(raw)


def test_invalid_value_is_named():
    raw = json.loads((CONFIGS / "deepseek-v4-flash.config.json").read_text())
    raw["o_groups"] = 7
    with pytest.raises(ConfigError, match="o_groups=7"):
        ModelConfig.from_dict(raw)


def test_longer_compress_ratios_are_cut():
    raw = json.loads((CONFIGS / "deepseek-v4-flash.config.json").read_text())
    raw["compress_ratios"] = raw["compress_ratios"] + [0, 0]
    assert len(ModelConfig.from_dict(raw).compress_ratios) == 44


def test_reference_numerics_block_check():
    config = load_preset("tiny").replace(head_dim=112)
    with pytest.raises(ConfigError, match="multiple of 64"):
        config.check_reference_numerics()
    load_preset("tiny").check_reference_numerics()
