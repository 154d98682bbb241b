"""Speculative decoding emits exactly the plain greedy tokens, whatever the drafter proposes."""

import pytest
import torch

from dsv4.engine.engine import LLMEngine
from dsv4.engine.sampler import SamplingParams
from dsv4.engine.speculative import FunctionDrafter, MTPDrafter

MAX_TOKENS = 12
PROMPT_LENGTHS = (5, 14, 31)  # acceptance ends on both sides of CSA/HCA block boundaries


def prompts(vocab: int = 512) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy(models):
    model = models("test-mix", "plain")
    outputs = LLMEngine(model).generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS))
    return {tuple(p): o.token_ids for p, o in zip(prompts(), outputs)}


def oracle(greedy, k: int, wrong_from: int | None = None):
    """Drafts from the true greedy continuation; from draft ``wrong_from`` on, wrong ones."""

    def propose(sequence):
        truth = greedy[tuple(sequence.prompt)][len(sequence.output): len(sequence.output) + k]
        if wrong_from is not None:
            truth = truth[:wrong_from] + [(t + 1) % 512 for t in truth[wrong_from:]]
        return truth

    return propose


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["perfect", "useless", "half"])
def test_drafter_output_equals_greedy(models, greedy, k, kind):
    model = models("test-mix", "plain")
    wrong_from = {"perfect": None, "useless": 0, "half": 1}[kind]
    engine = LLMEngine(model, drafter=FunctionDrafter(oracle(greedy, k, wrong_from), max_draft=k))
    outputs = engine.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS))
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == greedy[tuple(prompt)], f"prompt length {len(prompt)}"
        assert output.finish_reason == "length"


def test_perfect_drafter_needs_fewer_steps(models, greedy):
    model = models("test-mix", "plain")
    engine = LLMEngine(model, drafter=FunctionDrafter(oracle(greedy, 3), max_draft=3))
    engine.add_request("a", prompts()[0], SamplingParams(max_tokens=MAX_TOKENS))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    # 1 prefill step emits a token, then each step emits 4 (3 drafts + 1): 1 + ceil(11 / 4).
    assert steps == 4


def test_mtp_drafter_output_equals_greedy(models, greedy):
    model = models("test-mix", "plain")
    drafter = MTPDrafter()
    engine = LLMEngine(model, drafter=drafter)
    outputs = engine.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS))
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == greedy[tuple(prompt)]
    assert drafter.proposed > 0


def _layer_tensors(state):
    for layer in state.layers:
        yield "window", layer.window
        for name in ("compressor", "index_compressor"):
            buffer = getattr(layer, name)
            if buffer is not None:
                for field in ("kv", "score", "prev_kv", "prev_score"):
                    if getattr(buffer, field) is not None:
                        yield f"{name}.{field}", getattr(buffer, field)
        for name in ("compressed", "index_keys"):
            store = getattr(layer, name)
            if store is not None:
                yield name, store.view(torch.float32)


def test_rollback_restores_plain_decoding_state(models, greedy):
    """After rejected drafts the state equals the state of plain decoding at the same length."""
    model = models("test-mix", "plain")
    prompt = prompts()[1]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    plain = LLMEngine(model)
    speculative = LLMEngine(model, drafter=FunctionDrafter(oracle(greedy, 2, wrong_from=0), max_draft=2))
    for engine in (plain, speculative):
        engine.add_request("a", prompt, params)
    for step in range(8):
        plain.step()
        speculative.step()
        a, b = plain._sequences["a"], speculative._sequences["a"]
        assert a.num_computed == b.num_computed
        for (name, x), (_, y) in zip(_layer_tensors(a.state), _layer_tensors(b.state)):
            assert x.shape == y.shape, f"step {step}: {name}"
            finite = torch.isfinite(x)
            assert torch.equal(finite, torch.isfinite(y)), f"step {step}: {name}"
            difference = (x[finite] - y[finite]).abs()
            assert difference.numel() == 0 or float(difference.max()) <= 1e-5, f"step {step}: {name}"
