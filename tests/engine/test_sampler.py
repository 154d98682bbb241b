"""Sampling parameters through the engine, and the filters on their own."""

import math

import pytest
import torch

from dsv4.engine.engine import LLMEngine
from dsv4.engine.sampler import SamplingParams, filter_logits, new_generator, sample


def prompt(n: int = 10, seed: int = 0) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine_factory(models):
    model = models("test-mix", "plain")
    return lambda **kw: LLMEngine(model, **kw)


def test_seed_reproduces_tokens_regardless_of_batch(engine_factory):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1234)
    alone = engine_factory().generate([prompt()], params)[0].token_ids
    other = SamplingParams(max_tokens=6, temperature=1.0, seed=99)
    batched = engine_factory().generate([prompt(seed=3), prompt()], [other, params])[1].token_ids
    assert alone == batched


def test_narrow_filters_equal_greedy(engine_factory):
    greedy = engine_factory().generate([prompt()], SamplingParams(max_tokens=5))[0].token_ids
    top_k = engine_factory().generate([prompt()], SamplingParams(max_tokens=5, temperature=1.5, top_k=1,
                                                                seed=0))[0].token_ids
    top_p = engine_factory().generate([prompt()], SamplingParams(max_tokens=5, temperature=1.5, top_p=1e-6,
                                                                seed=0))[0].token_ids
    assert top_k == greedy
    assert top_p == greedy


def test_stop_token_ids_and_max_tokens(engine_factory):
    greedy = engine_factory().generate([prompt()], SamplingParams(max_tokens=6))[0]
    assert greedy.finish_reason == "length"
    stop_at = greedy.token_ids[2]
    stopped = engine_factory().generate([prompt()], SamplingParams(max_tokens=6, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]


def test_stop_strings(engine_factory):
    def detokenize(ids):
        return " ".join(f"<{i}>" for i in ids)

    greedy = engine_factory().generate([prompt()], SamplingParams(max_tokens=6))[0]
    needle = f"<{greedy.token_ids[1]}> <{greedy.token_ids[2]}"
    engine = engine_factory(detokenize=detokenize)
    stopped = engine.generate([prompt()], SamplingParams(max_tokens=6, stop=(needle,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[:3]


def test_logprobs_with_top_alternatives(engine_factory, models):
    model = models("test-mix", "plain")
    output = engine_factory().generate([prompt()], SamplingParams(max_tokens=3, logprobs=4))[0]
    logits = model.forward(torch.tensor([prompt() + output.token_ids]))[0]
    engine = engine_factory()
    engine.add_request("a", prompt(), SamplingParams(max_tokens=3, logprobs=4))
    collected = []
    for out in engine.stream():
        collected += out.new_logprobs
    assert [lp.token_id for lp in collected] == output.token_ids
    for step, lp in enumerate(collected):
        expected = logits[len(prompt()) - 1 + step].log_softmax(-1)
        assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=1e-5)
        assert len(lp.top) == 4
        assert lp.top[0][0] == lp.token_id  # greedy picks the best token
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_forced_tokens_override_sampling(engine_factory):
    forced = [5, 6, 7, 8]
    output = engine_factory().generate([prompt()], SamplingParams(max_tokens=4, forced_tokens=forced))[0]
    assert output.token_ids == forced


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    kept_k = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(kept_k).tolist() == [True, True, False, False]
    kept_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(kept_p).tolist() == [True, True, False, False]
    kept_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.isfinite(kept_p).tolist() == [True, True, True, False]


def test_sample_follows_distribution():
    logits = torch.tensor([0.0, math.log(3.0)])  # probabilities 1/4, 3/4
    generator = new_generator(0)
    draws = [sample(logits, SamplingParams(temperature=1.0), generator) for _ in range(2000)]
    assert 0.70 < sum(draws) / len(draws) < 0.80


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in"),
    ("top_k", -1, "top_k must be >= 0"),
])
def test_invalid_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
