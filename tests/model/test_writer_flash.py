"""A Flash-sized checkpoint cut to one layer with all 256 experts: written, validated, RSS bound.

The checkpoint has the real Flash shapes (embedding and head 129,280 x 4096, 256 FP4 experts in
layer 0 and in the MTP block): about 8.6 GiB on disk. The writer runs in a child process so
its peak resident memory can be measured on its own.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from dsv4.config import load_preset
from dsv4.model.checkpoint import CheckpointReader
from dsv4.model.layout import expected_tensors
from dsv4.model.writer import cut_config

pytestmark = pytest.mark.slow

RSS_LIMIT_GIB = 24  # the memory a Flash-layer checkpoint must be written and loaded within
WRITER_RSS_BUDGET_GIB = 4  # the writer holds about one tensor at a time (1 GiB embedding)


@pytest.fixture(scope="module")
def flash_one_layer(tmp_path_factory) -> Iterator[tuple[Path, float]]:
    """Write the checkpoint in a child process; yield its path and the child's peak RSS in GiB.

    The 8.6 GiB directory is deleted after the module's tests, since pytest keeps old tmp dirs.
    """
    out = tmp_path_factory.mktemp("flash") / "ckpt"
    script = textwrap.dedent(f"""
        import resource
        from dsv4.config import load_preset
        from dsv4.model.writer import write_random_checkpoint
        write_random_checkpoint(load_preset("flash"), {str(out)!r}, num_layers=1,
                                progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    peak_kib = int(result.stdout.split()[-1])  # ru_maxrss is in KiB on Linux
    yield out, peak_kib / 1024 ** 2
    shutil.rmtree(out, ignore_errors=True)


def test_flash_layer_writer_rss(flash_one_layer):
    _, peak_gib = flash_one_layer
    print(f"writer peak RSS: {peak_gib:.2f} GiB")
    assert peak_gib < WRITER_RSS_BUDGET_GIB
    assert peak_gib < RSS_LIMIT_GIB


def test_flash_layer_checkpoint_validates(flash_one_layer):
    path, _ = flash_one_layer
    reader = CheckpointReader(path)
    reader.validate()
    config = reader.config
    assert config == cut_config(load_preset("flash"), num_layers=1)
    assert config.n_routed_experts == 256
    assert reader.tensor("embed.weight").shape == (129280, 4096)
    assert reader.tensor("layers.0.ffn.experts.255.w1.weight").shape == (2048, 2048)
    assert reader.tensor("mtp.0.ffn.experts.255.w2.scale").shape == (4096, 64)
    total = sum(spec.nbytes for spec in expected_tensors(config).values())
    on_disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert total < on_disk < total + 1024 ** 2  # data plus headers only


def test_flash_layer_reader_is_lazy(flash_one_layer):
    path, _ = flash_one_layer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = CheckpointReader(path, check_scales=False)  # the scale check would read scales
    tensors = [reader.tensor(name) for name in reader.names()]  # views of the mapped shards
    assert len(tensors) == len(reader.names())
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 ** 2
    assert grown_gib < 0.5  # nothing was read: 8.6 GiB of views cost no memory


def test_flash_layer_forward_within_memory(flash_one_layer):
    """One forward on real Flash shapes (random values), in a child process so that its peak
    RSS is its own: weights stay memory-mapped and quantized, so the peak stays far below
    the checkpoint's 8.6 GiB plus a dequantized copy."""
    path, _ = flash_one_layer
    script = textwrap.dedent(f"""
        import resource, torch
        from dsv4.model.loading import load_model
        model = load_model({str(path)!r}, numerics="reference")
        ids = torch.tensor([[0, 17, 4242, 129279, 5, 6, 7, 8, 9]])
        logits = model(ids)
        assert logits.shape == (1, 9, 129280), logits.shape
        assert torch.isfinite(logits).all()
        print(float(logits.std()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    std, peak_kib = result.stdout.split()[-2:]
    peak_gib = int(peak_kib) / 1024 ** 2
    print(f"forward peak RSS: {peak_gib:.2f} GiB, logits std {float(std):.3f}")
    assert 0.05 < float(std) < 100
    assert peak_gib < 8
