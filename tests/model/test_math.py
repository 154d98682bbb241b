"""Hand-computed checks of the model's pieces: RoPE tables, hyper-connections, attention sink,
compressor boundaries, visibility, routing and the indexer's top-k rule."""

import math

import pytest
import torch

from dsv4.config import load_preset
from dsv4.model import hyper
from dsv4.model.attention import sparse_attention
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import select_topk
from dsv4.model.kv_state import CompressorBuffer
from dsv4.model.linear import Numerics
from dsv4.model.loading import build_from_tensors
from dsv4.model.moe import MoE
from dsv4.model.rope import RopeTable, apply_rope, layer_frequencies, rope_cos_sin, yarn_correction_range

from support.random_weights import random_official_tensors


# ---------------------------------------------------------------------- RoPE

def independent_yarn(theta, dim, factor, original, beta_fast, beta_slow):
    """The YaRN frequency table written out with Python floats."""
    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo = max(math.floor(correction(beta_fast)), 0)
    hi = min(math.ceil(correction(beta_slow)), dim - 1)
    out = []
    for k in range(dim // 2):
        omega = theta ** (-2 * k / dim)
        ramp = min(max((k - lo) / (hi - lo), 0.0), 1.0)
        out.append(omega * (1 - ramp) + omega / factor * ramp)
    return out


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_layer_frequency_tables(preset):
    config = load_preset(preset)
    expected_yarn = independent_yarn(160000.0, 64, 16.0, 65536, 32.0, 1.0)
    expected_plain = [10000.0 ** (-2 * k / 64) for k in range(32)]
    for ratio in set(config.compress_ratios):
        table = layer_frequencies(config, ratio).double()
        expected = torch.tensor(expected_plain if ratio == 0 else expected_yarn, dtype=torch.float64)
        assert torch.allclose(table, expected, rtol=1e-6, atol=0), f"ratio {ratio}"
    assert yarn_correction_range(160000.0, 64, config.rope_scaling) == (15, 25)
    # Sliding-only layers and the MTP block: plain base 10000.
    assert config.mtp_ratios == (0,)


@pytest.mark.parametrize("position", [0, 1, 127, 65535, 65536, 2**20 - 1])
def test_rope_angles_and_unit_magnitude(position):
    config = load_preset("flash")
    freqs = layer_frequencies(config, 4)
    cos, sin = rope_cos_sin(freqs, torch.tensor([position]), torch.float64)
    # No YaRN magnitude factor: every rotation is a pure rotation.
    assert torch.allclose(cos.square() + sin.square(), torch.ones_like(cos), atol=1e-6)
    exact = torch.tensor(independent_yarn(160000.0, 64, 16.0, 65536, 32.0, 1.0), dtype=torch.float64) * position
    angle = torch.atan2(sin, cos)[0]
    # Angles are float32 products, as in DeepSeek's reference: one rounding of p * omega.
    bound = exact.abs() * 2**-23 + 1e-6
    assert torch.all(torch.remainder(angle - exact + math.pi, 2 * math.pi) - math.pi <= bound + 1e-6)


def test_rope_rotates_interleaved_pairs_of_the_last_dims():
    head_dim, rope_dim = 16, 8
    freqs = torch.tensor([1.0, 0.5, 0.25, 0.125])
    cos, sin = rope_cos_sin(freqs, torch.tensor([3]), torch.float32)
    x = torch.zeros(1, head_dim)
    x[0, 2] = 5.0  # a leading (non-rope) channel stays put
    x[0, 8 + 2] = 1.0  # pair k = 1 is channels (10, 11)
    y = apply_rope(x, cos, sin)
    angle = 3 * 0.5
    expected = torch.zeros(1, head_dim)
    expected[0, 2] = 5.0
    expected[0, 10] = math.cos(angle)
    expected[0, 11] = math.sin(angle)
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(apply_rope(y, cos, sin, inverse=True), x, atol=1e-6)


# ---------------------------------------------------------------------- hyper-connections

def test_hyper_connection_mix_uses_comb_transposed():
    streams = torch.arange(1, 13, dtype=torch.float32).view(1, 4, 3)  # 4 distinct streams, d=3
    comb = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                         [0.0, 0.5, 0.5, 0.0],
                         [0.2, 0.2, 0.3, 0.3],
                         [0.1, 0.2, 0.1, 0.6]]).unsqueeze(0)
    post = torch.tensor([[0.5, 1.0, 1.5, 0.25]])
    output = torch.tensor([[1.0, -1.0, 2.0]])
    got = hyper.hc_expand(output, streams, post, comb)
    for k in range(4):
        expected = post[0, k] * output[0] + sum(comb[0, j, k] * streams[0, j] for j in range(4))
        assert torch.allclose(got[0, k], expected, atol=1e-6)
    wrong = hyper.hc_expand(output, streams, post, comb.transpose(-1, -2))
    assert not torch.allclose(got, wrong)


def test_hyper_connection_weight_ranges():
    gen = torch.Generator().manual_seed(0)
    streams = torch.randn(5, 4, 8, generator=gen)
    fn = torch.randn(24, 32, generator=gen) * 0.1  # logits of order 1, as trained models have
    base = torch.randn(24, generator=gen)
    scale = torch.tensor([1.0, 1.0, 1.0])
    pre, post, comb = hyper.hc_weights(streams, fn, base, scale, iters=20, hc_eps=1e-6, norm_eps=1e-6)
    assert torch.all(pre > 1e-6)
    assert torch.all(pre < 1 + 1e-6)
    assert torch.all(post > 0)
    assert torch.all(post < 2)
    assert torch.allclose(comb.sum(-1), torch.ones(5, 4), atol=1e-3)
    assert torch.allclose(comb.sum(-2), torch.ones(5, 4), atol=1e-5)


# ---------------------------------------------------------------------- attention core

def test_sink_only_enlarges_the_denominator():
    q = torch.tensor([[[1.0, 0.0]]])  # [n=1, H=1, D=2]
    keys = torch.tensor([[2.0, 3.0], [0.0, 1.0]])
    index = torch.tensor([[0, -1]])
    sink = torch.tensor([0.5])
    out = sparse_attention(q, sink, 1.0, gathered=[(keys, index)])
    score = 2.0
    weight = math.exp(score) / (math.exp(score) + math.exp(0.5))
    assert torch.allclose(out[0, 0], weight * keys[0], atol=1e-6)
    # A very negative sink leaves plain softmax.
    out = sparse_attention(q, torch.tensor([-1e9]), 1.0, gathered=[(keys, torch.tensor([[0, 1]]))])
    probs = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert torch.allclose(out[0, 0], probs[0] * keys[0] + probs[1] * keys[1], atol=1e-6)


def test_one_query_alone_equals_last_row_of_a_batch():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 2, 8, generator=gen)
    keys = torch.randn(10, 8, generator=gen)
    index = torch.randint(-1, 10, (6, 5), generator=gen)
    sink = torch.randn(2, generator=gen)
    batch = sparse_attention(q, sink, 0.3, gathered=[(keys, index)])
    alone = sparse_attention(q[-1:], sink, 0.3, gathered=[(keys, index[-1:])])
    assert torch.equal(batch[-1:], alone)


def test_key_ranges_equal_gathered_rows():
    """Rows [begin, end) scored by a matmul equal the same rows gathered by index."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 3, 8, generator=gen)
    keys = torch.randn(9, 8, generator=gen)
    begin = torch.tensor([0, 0, 2, 3, 6])
    end = torch.tensor([0, 1, 5, 9, 7])
    picked = torch.randint(-1, 9, (5, 3), generator=gen)
    sink = torch.randn(3, generator=gen)
    by_range = sparse_attention(q, sink, 0.4, ranges=[(keys, begin, end)], gathered=[(keys, picked)])
    columns = torch.arange(9)
    index = torch.where((columns >= begin.unsqueeze(1)) & (columns < end.unsqueeze(1)), columns, -1)  # [5, 9]
    by_index = sparse_attention(q, sink, 0.4, gathered=[(keys, index), (keys, picked)])
    assert torch.allclose(by_range, by_index, atol=1e-6)
    # The first query's range is empty: only its gathered keys count.
    alone = sparse_attention(q[:1], sink, 0.4, gathered=[(keys, picked[:1])])
    assert torch.allclose(by_range[:1], alone, atol=1e-6)


# ---------------------------------------------------------------------- compressor

def make_compressor(ratio, dim=8, head_dim=8, rope_dim=4, seed=0):
    config = load_preset("test-mix").replace(head_dim=head_dim, qk_rope_head_dim=rope_dim)
    comp = Compressor(dim, head_dim, rope_dim, ratio, 1e-6, RopeTable(config, ratio), Numerics("plain"))
    gen = torch.Generator().manual_seed(seed)
    width = comp.wkv.weight.shape[0]
    comp.wkv.weight.data = torch.randn(width, dim, generator=gen).to(torch.bfloat16)
    comp.wgate.weight.data = torch.randn(width, dim, generator=gen).to(torch.bfloat16)
    comp.ape.data = torch.randn(ratio, width, generator=gen)
    return comp


@pytest.mark.parametrize("length,entries", [(3, 0), (4, 1), (5, 1), (7, 1), (8, 2), (9, 2)])
def test_first_complete_csa_block(length, entries):
    comp = make_compressor(4)
    x = torch.randn(length, 8, generator=torch.Generator().manual_seed(2))
    buffer = CompressorBuffer.empty(4, 16, True, "cpu")
    out = comp(x, 0, buffer)
    assert out.shape == (entries, 8)
    assert torch.isfinite(out).all()
    if entries:
        # Block 0 has no previous block: only its own four second halves take part.
        a = comp.wkv(x[:4])[:, 8:]
        z = comp.wgate(x[:4])[:, 8:] + comp.ape[:, 8:]
        pooled = (torch.softmax(z, 0) * a).sum(0)
        expected = comp.norm(pooled)  # rotation at position 0 is the identity
        assert torch.allclose(out[0], expected, atol=1e-5)


def test_compressor_chunks_equal_one_pass():
    for ratio in (4, 8):
        x = torch.randn(29, 8, generator=torch.Generator().manual_seed(3))
        whole = make_compressor(ratio)(x, 0, CompressorBuffer.empty(ratio, 16 if ratio == 4 else 8, ratio == 4, "cpu"))
        comp = make_compressor(ratio)
        buffer = CompressorBuffer.empty(ratio, 16 if ratio == 4 else 8, ratio == 4, "cpu")
        parts = [comp(x[a:b], a, buffer) for a, b in ((0, 3), (3, 4), (4, 13), (13, 14), (14, 29))]
        assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


# ---------------------------------------------------------------------- visibility through the model

def model_for(config, seed=0):
    tensors = random_official_tensors(config, seed)
    return build_from_tensors(config, tensors.__getitem__, numerics="plain", dtype=torch.float32)


def changed_positions(model, ids, position):
    other = ids.clone()
    other[0, position] = (other[0, position] + 1) % model.config.vocab_size
    delta = (model(ids) - model(other)).abs().amax(-1)[0]
    # 1e-4: regrouping tokens per expert moves unrelated rows by float32 noise only.
    return set((delta > 1e-4).nonzero().flatten().tolist())


def test_compressed_entry_visible_only_once_its_block_is_complete():
    config = load_preset("test-mix").replace(
        num_hidden_layers=1, compress_ratios=(8, 0), sliding_window=4, num_hash_layers=0,
        weight_dtype="bf16", expert_dtype="bf16", num_nextn_predict_layers=1)
    model = model_for(config)
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    changed = changed_positions(model, ids, 2)
    # Token 2 reaches queries 2..5 through the window and queries >= 7 through entry 0
    # (block 0 = tokens 0..7, complete at position 7); query 6 sees neither.
    assert changed == {2, 3, 4, 5} | set(range(7, 20))


def test_distant_token_reaches_through_compressed_layers():
    config = load_preset("test-mix").replace(weight_dtype="bf16", expert_dtype="bf16", sliding_window=8)
    model = model_for(config)
    ids = torch.randint(0, config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(5))
    assert 59 in changed_positions(model, ids, 19)


# ---------------------------------------------------------------------- MoE

def moe_for(hashed, top_k=2, experts=4, seed=0):
    config = load_preset("test-mix").replace(hidden_size=16, moe_intermediate_size=8, n_routed_experts=experts,
                                             num_experts_per_tok=top_k, weight_dtype="bf16",
                                             expert_dtype="bf16", vocab_size=8)
    moe = MoE(config, hashed, Numerics("plain"))
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in moe.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return moe


def test_gate_bias_changes_selection_not_weights():
    moe = moe_for(hashed=False)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))
    moe.gate.bias.data.zero_()
    weights, indices = moe.gate(x, torch.zeros(3, dtype=torch.long))
    moe.gate.bias.data = torch.tensor([0.0, 0.0, 0.0, 100.0])
    weights_b, indices_b = moe.gate(x, torch.zeros(3, dtype=torch.long))
    assert torch.all((indices_b == 3).any(-1))
    scores = torch.nn.functional.softplus(x @ moe.gate.weight.float().T).sqrt()
    expected = scores.gather(1, indices_b)
    expected = expected / expected.sum(-1, keepdim=True) * moe.gate.route_scale
    assert torch.allclose(weights_b, expected, atol=1e-6)


def test_hash_routing_takes_experts_from_tid2eid_and_runs_a_repeat_once():
    moe = moe_for(hashed=True)
    moe.gate.tid2eid.copy_(torch.tensor([[0, 1], [2, 2]] + [[0, 1]] * 6))
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))
    tokens = torch.tensor([0, 1])
    weights, indices = moe.gate(x, tokens)
    assert indices.tolist() == [[0, 1], [2, 2]]
    assert torch.allclose(weights[1], torch.full((2,), moe.gate.route_scale / 2))
    out = moe(x, tokens)
    shared = moe.shared_experts(x).float()
    # Token 1 lists expert 2 twice: it runs once, with one slot's weight.
    expected = moe.experts[2](x[1:2], weights[1:2, :1]).float() + shared[1:2]
    assert torch.allclose(out[1:2], expected, atol=1e-5)


def test_swiglu_clamp():
    moe = moe_for(hashed=False)
    expert = moe.experts[0]
    x = torch.randn(1, 16)
    gate = expert.w1(x).float()
    up = expert.w3(x).float()
    expert.swiglu_limit = 0.1
    clamped = expert(x)
    manual = torch.nn.functional.silu(gate.clamp(max=0.1)) * up.clamp(-0.1, 0.1)
    assert torch.allclose(clamped, expert.w2(manual), atol=1e-6)


# ---------------------------------------------------------------------- indexer selection

def test_topk_breaks_ties_towards_lower_index():
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0, 2.0, 1.0]])
    got = select_topk(scores, torch.tensor([6]), 3)
    assert got.tolist() == [[1, 4, 5]]
    got = select_topk(scores, torch.tensor([6]), 4)
    assert got.tolist() == [[0, 1, 4, 5]]


def test_topk_respects_visibility_and_pads():
    scores = torch.tensor([[5.0, 4.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    got = select_topk(scores, torch.tensor([1, 4]), 2)
    assert got.tolist() == [[0, -1], [2, 3]]


def test_topk_matches_brute_force():
    gen = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 5, (40, 30), generator=gen).float()  # many ties
    visible = torch.randint(0, 31, (40,), generator=gen)
    got = select_topk(scores, visible, 7)
    for row in range(40):
        candidates = sorted(range(int(visible[row])), key=lambda s: (-scores[row, s].item(), s))[:7]
        expected = sorted(candidates) + [-1] * (7 - len(candidates))
        assert got[row].tolist() == expected


def test_cached_dequantized_weights_give_identical_logits():
    config = load_preset("test-mix")
    tensors = random_official_tensors(config, seed=9)
    model = build_from_tensors(config, tensors.__getitem__, numerics="reference", dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(9))
    before = model(ids)
    assert model.cache_dequantized_weights(0) == 0
    assert model.cache_dequantized_weights(1 << 30) > 0
    assert torch.equal(model(ids), before)


def test_query_without_keys_gives_zero():
    q = torch.randn(2, 1, 4)
    keys = torch.randn(4, 4)
    empty = torch.zeros(2, dtype=torch.long)
    out = sparse_attention(q, torch.zeros(1), 1.0, ranges=[(keys, empty, empty)])
    assert torch.equal(out, torch.zeros_like(q))


def test_topk_never_selects_nan():
    nan = float("nan")
    for row in ([nan, 1.0, 2.0], [nan, 1.0, 1.0], [1.0, nan, 3.0, 2.0]):
        got = select_topk(torch.tensor([row]), torch.tensor([len(row)]), 2)[0].tolist()
        assert all(row[i] == row[i] for i in got if i >= 0), f"row {row} selected {got}"
