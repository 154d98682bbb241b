"""Parity with transformers' DeepseekV4ForCausalLM (5.23.0) on the same random weights.

Plain numerics in float32. transformers 5.8.0 is wrong (hyper-connection matrix untransposed,
YaRN on every layer); 5.8.1 and newer are a valid reference. Configs use 8 index heads so
that no two index scores tie at the top-k boundary (transformers breaks ties arbitrarily).
"""

import pytest
import torch

from dsv4.config import load_preset
from dsv4.model.hf_names import to_transformers_config, to_transformers_state_dict
from dsv4.model.loading import build_from_tensors

from support.random_weights import dequantized, random_official_tensors

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def small(**changes):
    base = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
                q_lora_rank=32, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16,
                moe_intermediate_size=32, n_routed_experts=6, num_experts_per_tok=2,
                weight_dtype="bf16", expert_dtype="bf16")
    base.update(changes)
    layers = len(base["compress_ratios"]) - 1
    return load_preset("tiny").replace(num_hidden_layers=layers, **base)


# (id, config, full-forward length). Lengths cross every residue mod 4 and mod the HCA ratio,
# the window, and index_topk x 4 (where the indexer starts discarding).
CONFIGS = [
    ("mix-w8-r8", small(compress_ratios=(0, 4, 8, 4, 0), sliding_window=8, index_topk=2, num_hash_layers=2), 70),
    ("csa-hca-w16", small(compress_ratios=(4, 8, 0), sliding_window=16, index_topk=3, num_hash_layers=1), 60),
    ("flash-like", small(compress_ratios=(0, 0, 4, 16, 4, 16, 0), sliding_window=8, index_topk=2,
                         num_hash_layers=3), 80),
    ("pro-like", small(compress_ratios=(8, 8, 4, 8, 0), sliding_window=8, index_topk=1, num_hash_layers=1), 50),
    ("csa-only", small(compress_ratios=(4, 4, 0), sliding_window=4, index_topk=2, num_hash_layers=1), 40),
    ("b2-shape", small(compress_ratios=(0, 4, 128, 4, 0), sliding_window=128, index_topk=8,
                       num_hash_layers=1, vocab_size=512), 300),
    ("no-hash-fp8", small(compress_ratios=(0, 4, 8, 0), sliding_window=8, index_topk=2, num_hash_layers=0,
                          weight_dtype="fp8", expert_dtype="fp4", hidden_size=128, q_lora_rank=128,
                          o_lora_rank=64, moe_intermediate_size=128, head_dim=64, qk_rope_head_dim=16), 45),
]


def transformers_model(config, tensors):
    hf_config = to_transformers_config(config)
    hf_config._attn_implementation = "eager"
    model = transformers.DeepseekV4ForCausalLM(hf_config).float().eval()
    state = to_transformers_state_dict(dequantized(tensors))
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("name,config,length", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_match_transformers(name, config, length):
    tensors = random_official_tensors(config, seed=len(name))
    ours = build_from_tensors(config, tensors.__getitem__, numerics="plain", dtype=torch.float32)
    theirs = transformers_model(config, tensors)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=gen)

    # A causal forward's logits at position t depend on tokens <= t only, so one long
    # forward checks every prefix length; the short runs check lengths at the boundaries.
    lengths = sorted({1, 3, 4, 5, config.sliding_window - 1, config.sliding_window,
                      config.sliding_window + 1, 4 * config.index_topk + 1, length})
    for seq in lengths:
        with torch.no_grad():
            expected = theirs(input_ids=ids[:, :seq]).logits.float()
        got = ours(ids[:, :seq])
        error = (got - expected).abs().max().item()
        assert error <= TOLERANCE, f"length {seq}: max |logit difference| {error:.2e}"


def test_batch_rows_are_independent():
    name, config, _ = CONFIGS[0]
    tensors = random_official_tensors(config, seed=3)
    ours = build_from_tensors(config, tensors.__getitem__, numerics="plain", dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(2))
    together = ours(ids)
    for row in range(3):
        alone = ours(ids[row: row + 1])
        assert torch.allclose(together[row], alone[0], atol=1e-5, rtol=0)
