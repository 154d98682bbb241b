import json
from pathlib import Path

import pytest

from dsv4.config import ModelConfig
from dsv4.model.safetensors_io import SafetensorsFile

SHARED = Path(__file__).resolve().parents[3] / "shared"
REFERENCE_LOGITS = SHARED / "fixtures" / "reference_logits"


class FixtureCheckpoint:
    """A reference-logits fixture: its checkpoint tensors and DeepSeek's expected logits."""

    def __init__(self, name: str):
        root = REFERENCE_LOGITS / name
        self.checkpoint = root / "checkpoint"
        self.config = ModelConfig.from_file(self.checkpoint)
        weight_map = json.loads((self.checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
        files = {f: SafetensorsFile(self.checkpoint / f) for f in set(weight_map.values())}
        self.tensor = lambda name: files[weight_map[name]].tensor(name)
        expected = SafetensorsFile(root / "expected.safetensors")
        self.input_ids = expected.tensor("input_ids")
        self.logits = {mode: expected.tensor(f"logits_{mode}_fp32") for mode in ("plain", "reference")}


@pytest.fixture(scope="session")
def fixture_checkpoints():
    cache = {}

    def get(name: str) -> FixtureCheckpoint:
        if name not in cache:
            cache[name] = FixtureCheckpoint(name)
        return cache[name]

    return get
