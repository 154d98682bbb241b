"""The model against logits computed by DeepSeek's own V4 inference code on two tiny checkpoints."""

import pytest
import torch

from dsv4.model import quant
from dsv4.model.loading import build_from_tensors, load_model

TOLERANCE = 1e-4

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def max_error_per_position(logits, expected):
    return (logits - expected).abs().amax(-1)[0]  # [S]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mix16", "flash16"])
def test_plain_numerics_match_reference_code(fixture_checkpoints, name, device):
    fx = fixture_checkpoints(name)
    model = load_model(fx.checkpoint, numerics="plain", dtype=torch.float32, device=device)
    logits = model(fx.input_ids.to(device)).cpu()
    error = max_error_per_position(logits, fx.logits["plain"])
    assert error.max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(-1), fx.logits["plain"].argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_numerics_flash16(fixture_checkpoints, device):
    fx = fixture_checkpoints("flash16")
    model = load_model(fx.checkpoint, numerics="reference", dtype=torch.float32, device=device)
    error = max_error_per_position(model(fx.input_ids.to(device)).cpu(), fx.logits["reference"])
    assert error.max().item() <= TOLERANCE


def test_reference_numerics_mix16_flip_is_one_rounding(fixture_checkpoints, monkeypatch):
    """mix16 agrees except where one FP8 rounding sits on a boundary; the test finds that
    rounding and shows that nudging its input by 3e-5 (relative) makes every position agree.

    Rounding is discontinuous: a value within float32 noise of a midpoint between two FP8
    codes rounds one way here and the other way in DeepSeek's code. The changed activation of
    that one token reaches later tokens through the window and the compressed entries.
    """
    fx = fixture_checkpoints("mix16")
    expected = fx.logits["reference"]
    model = build_from_tensors(fx.config, fx.tensor, numerics="reference", dtype=torch.float32)
    base = model(fx.input_ids)
    differing = (max_error_per_position(base, expected) > TOLERANCE).nonzero().flatten().tolist()
    seq = fx.input_ids.shape[1]
    # Most positions agree; the few that do not must all trace back to one rounding.
    assert len(differing) <= seq // 10
    if not differing:
        return
    first = differing[0]

    originals = {"fp8": quant.fp8_round_trip, "fp4": quant.fp4_round_trip}
    calls = []
    nudge = {}

    def wrap(kind):
        def round_trip(x, block):
            index = len(calls)
            calls.append((kind, x.shape[0]))
            if nudge.get("call") == index:
                x = x.clone()
                x[first] = x[first] * (1 + nudge["sign"] * 3e-5)
            return originals[kind](x, block)
        return round_trip

    monkeypatch.setattr(quant, "fp8_round_trip", wrap("fp8"))
    monkeypatch.setattr(quant, "fp4_round_trip", wrap("fp4"))
    model(fx.input_ids)
    candidates = [i for i, (_, rows) in enumerate(calls) if rows == seq]

    explained = None
    for index in candidates:
        for sign in (1, -1):
            calls.clear()
            nudge.update(call=index, sign=sign)
            nudged = model(fx.input_ids)
            if max_error_per_position(nudged, expected).max().item() <= TOLERANCE:
                explained = (calls[index][0], index, sign)
                break
        if explained:
            break
    assert explained is not None, (
        f"positions {differing} differ from the reference and no single rounding of token "
        f"{first} explains it")
