"""LLMEngine end to end: greedy output, reuse, storage formats, cache bytes, abort, prefixes."""

import pytest
import torch

from dsv4.config import load_preset
from dsv4.engine.cache_manager import CacheFullError
from dsv4.engine.engine import EngineConfig, LLMEngine
from dsv4.engine.runner import ModelRunner
from dsv4.engine.sampler import SamplingParams
from dsv4.engine.scheduler import SchedulerConfig
from dsv4.model.transformer import Transformer


def token_ids(count: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def logprob_trace(output):
    """Sampled tokens with their logprobs and top alternatives, for bitwise comparisons."""
    return [(lp.token_id, lp.logprob, lp.top) for lp in output.new_logprobs or []]


def run_to_end(engine, prompt, params):
    request_id = engine.add_request(None, prompt, params)
    trace, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                trace += logprob_trace(output)
                final = output
    return final, trace


def test_batched_greedy_equals_full_forward(models):
    model = models("test-mix", "plain")
    prompts = [token_ids(n, seed=n) for n in (3, 17, 40)]
    engine = LLMEngine(model, EngineConfig(scheduler=SchedulerConfig(prefill_chunk=16)))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6))
    for prompt, output in zip(prompts, outputs):
        assert output.finish_reason == "length"
        assert len(output.token_ids) == 6
        logits = model.forward(torch.tensor([prompt + output.token_ids]))[0]
        expected = logits[len(prompt) - 1: -1].argmax(-1).tolist()
        assert output.token_ids == expected


def test_second_request_equals_fresh_engine(models):
    """A 37-token request, then prompts of 1..9 tokens: bitwise equal to a new engine."""
    model = models("test-mix", "plain")
    params = SamplingParams(max_tokens=2, logprobs=3)
    reused = LLMEngine(model)
    run_to_end(reused, token_ids(37, seed=1), params)
    for length in range(1, 10):
        prompt = token_ids(length, seed=100 + length)
        _, again = run_to_end(reused, prompt, params)
        _, fresh = run_to_end(LLMEngine(model), prompt, params)
        assert again == fresh, f"prompt length {length}"


def test_deployment_storage_is_lossless_in_reference_numerics(models):
    model = models("test-mix", "reference")
    params = SamplingParams(max_tokens=5, logprobs=4)
    prompt = token_ids(45, seed=9)
    traces = {}
    for storage in ("float", "deployment"):
        engine = LLMEngine(model, EngineConfig(storage=storage))
        _, traces[storage] = run_to_end(engine, prompt, params)
    assert traces["float"] == traces["deployment"]


@pytest.mark.parametrize("preset", ["test-mix", "test-window", "tiny"])
@pytest.mark.parametrize("storage", ["float", "deployment"])
def test_allocated_bytes_equal_formula(preset, storage):
    model = Transformer(load_preset(preset), numerics="plain")
    engine = LLMEngine(model, EngineConfig(storage=storage, block_entries=16))
    for context in (10, 333, 5000):
        state = engine.runner.new_state(context)
        assert engine.runner.held_bytes(state) == engine.cache.bytes_for(context), f"context {context}"


def test_engine_metrics_report_reserved_bytes(models):
    model = models("test-mix", "plain")
    engine = LLMEngine(model, EngineConfig(storage="deployment"))
    engine.add_request("a", token_ids(30, seed=2), SamplingParams(max_tokens=50))
    engine.add_request("b", token_ids(5, seed=3), SamplingParams(max_tokens=3))
    engine.step()
    metrics = engine.metrics()
    assert metrics["running"] == 2
    assert metrics["cache_bytes"] == metrics["cache_bytes_reserved"]
    expected = {kind: engine.cache.bytes_for(80)[kind] + engine.cache.bytes_for(8)[kind]
                for kind in metrics["cache_bytes"]}
    assert metrics["cache_bytes"] == expected


def test_abort_frees_cache_at_once(models):
    model = models("test-mix", "plain")
    engine = LLMEngine(model)
    engine.add_request("a", token_ids(12, seed=4), SamplingParams(max_tokens=20))
    engine.add_request("b", token_ids(9, seed=5), SamplingParams(max_tokens=20))
    engine.step()
    assert engine.abort_request("a")
    assert engine.cache.bytes_in_use() == sum(engine.cache.bytes_for(29).values())
    assert not engine.abort_request("a")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a"]
    assert len(aborted) == 1
    assert aborted[0].finish_reason == "abort"
    assert engine.abort_request("b")
    engine.step()
    assert engine.cache.bytes_in_use() == 0
    assert not engine.has_unfinished_requests()


def test_request_over_cache_budget_is_rejected(models):
    model = models("test-mix", "plain")
    engine = LLMEngine(model, EngineConfig(cache_budget_bytes=200_000))
    with pytest.raises(CacheFullError, match="cache budget is 200000 bytes"):
        engine.add_request("big", token_ids(10, seed=6), SamplingParams(max_tokens=2000))


def test_invalid_requests_are_rejected(models):
    engine = LLMEngine(models("test-mix", "plain"))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        engine.add_request("a", [1, 512], SamplingParams())
    with pytest.raises(ValueError, match="stop strings need a detokenizer"):
        engine.add_request("a", [1], SamplingParams(stop=("x",)))
    engine.add_request("a", [1], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [2], SamplingParams())


@pytest.mark.parametrize("prefix_length", [12, 13, 14, 15, 16, 17])
def test_prefix_snapshot_equals_cold_run(models, prefix_length):
    """Around the window (16) and every residue mod 4: restored == cold, bitwise."""
    model = models("test-mix", "plain")
    prompt = token_ids(prefix_length + 5, seed=prefix_length)
    params = SamplingParams(max_tokens=4, logprobs=3)
    chunked = EngineConfig(scheduler=SchedulerConfig(prefill_chunk=prefix_length))
    _, cold = run_to_end(LLMEngine(model, chunked), prompt, params)

    warm = LLMEngine(model, EngineConfig(prefix_cache=True))
    warm.cache_prefix(prompt[:prefix_length])
    output, restored = run_to_end(warm, prompt, params)
    assert output.cached_tokens == prefix_length
    assert warm.cache_hit_tokens == prefix_length
    assert restored == cold


def test_prefix_shared_by_two_running_requests(models):
    model = models("test-mix", "plain")
    prefix = token_ids(21, seed=7)
    suffixes = [token_ids(4, seed=8), token_ids(6, seed=9)]
    params = SamplingParams(max_tokens=4, logprobs=2)
    warm = LLMEngine(model, EngineConfig(prefix_cache=True))
    warm.cache_prefix(prefix)
    outputs = warm.generate([prefix + s for s in suffixes], params)
    for suffix, output in zip(suffixes, outputs):
        assert output.cached_tokens == 21
        cold = LLMEngine(model, EngineConfig(scheduler=SchedulerConfig(prefill_chunk=21)))
        expected = cold.generate([prefix + suffix], params)[0]
        assert output.token_ids == expected.token_ids


def test_prefix_snapshot_file_round_trip(models, tmp_path):
    model = models("test-mix", "plain")
    prompt = token_ids(30, seed=10)
    params = SamplingParams(max_tokens=3, logprobs=2)
    first = LLMEngine(model, EngineConfig(prefix_cache=True))
    prefix = first.cache_prefix(prompt[:25])
    path = tmp_path / "prefix.snap"
    first.prefixes.save(prefix, path)
    _, expected = run_to_end(first, prompt, params)

    second = LLMEngine(model, EngineConfig(prefix_cache=True))
    second.prefixes.load(path)
    output, restored = run_to_end(second, prompt, params)
    assert output.cached_tokens == 25
    assert restored == expected


def test_prefix_snapshot_file_checks(models, tmp_path):
    model = models("test-mix", "plain")
    engine = LLMEngine(model, EngineConfig(prefix_cache=True))
    path = tmp_path / "prefix.snap"
    engine.prefixes.save(engine.cache_prefix(token_ids(9, seed=11)), path)

    other = LLMEngine(models("test-mix", "reference"), EngineConfig(prefix_cache=True))
    with pytest.raises(ValueError, match="made by another model or config"):
        other.prefixes.load(path)

    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt"):
        engine.prefixes.load(path)


def test_runner_rejects_unknown_storage(models):
    with pytest.raises(ValueError, match="unknown cache storage 'fp2'"):
        ModelRunner(models("test-mix", "plain"), storage="fp2")


def test_upcast_weights_keeps_tokens_and_logprobs():
    """Upcasting is exact; only the head, stored transposed, sums in another order."""
    from support.engine_helpers import random_model

    model = random_model("test-mix", "plain", seed=5)
    prompt = token_ids(20, seed=12)
    params = SamplingParams(max_tokens=3, logprobs=3)
    _, before = run_to_end(LLMEngine(model), prompt, params)
    engine = LLMEngine(model, EngineConfig(upcast_weights=True))
    assert model.head.weight.dtype == torch.float32
    assert model.head.weight.stride() == (1, model.config.vocab_size)  # [V, d] view of [d, V] memory
    assert model.embed.weight.dtype == torch.bfloat16  # a lookup converts only the rows it reads
    _, after = run_to_end(engine, prompt, params)
    assert [token for token, _, _ in after] == [token for token, _, _ in before]
    for (_, logprob_after, top_after), (_, logprob_before, top_before) in zip(after, before):
        assert logprob_after == pytest.approx(logprob_before, abs=1e-5)
        assert [t for t, _ in top_after] == [t for t, _ in top_before]
        assert [lp for _, lp in top_after] == pytest.approx([lp for _, lp in top_before], abs=1e-5)


def test_request_longer_than_context_rejected(models):
    model = models("test-mix", "plain")
    limit = model.config.max_position_embeddings
    engine = LLMEngine(model)
    prompt = [5] * 10
    with pytest.raises(ValueError, match=rf"10 prompt tokens plus max_tokens={limit} exceed .* {limit} tokens"):
        engine.add_request("long", prompt, SamplingParams(max_tokens=limit))
    assert not engine.has_unfinished_requests()
    engine.add_request("fits", prompt, SamplingParams(max_tokens=limit - 10))
    assert engine.has_unfinished_requests()


def test_generate_adds_all_prompts_or_none(models):
    model = models("test-mix", "plain")
    limit = model.config.max_position_embeddings
    engine = LLMEngine(model)
    params = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=limit)]
    with pytest.raises(ValueError, match="exceed the model's context"):
        engine.generate([[1, 2, 3], [4] * 10], params)
    engine.step()  # reports the aborted first prompt
    assert not engine.has_unfinished_requests()


def test_prompt_at_context_limit_names_shorter_prompt(models):
    model = models("test-mix", "plain")
    limit = model.config.max_position_embeddings
    engine = LLMEngine(model)
    with pytest.raises(ValueError, match=f"shorten the prompt to at most {limit - 1} tokens"):
        engine.add_request("full", [3] * limit, SamplingParams(max_tokens=1))
