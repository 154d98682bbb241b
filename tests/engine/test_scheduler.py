import subprocess
import sys

import pytest

from dsv4.config import load_preset
from dsv4.engine.cache_manager import CacheFullError, CacheManager, float_format
from dsv4.engine.scheduler import Scheduler, SchedulerConfig


class FakeSequence:
    def __init__(self, request_id: str, prompt: int, max_tokens: int = 4):
        self.request_id = request_id
        self.num_prompt = prompt
        self.num_computed = 0
        self.generated = 0
        self.max_tokens = max_tokens

    @property
    def num_known(self) -> int:
        return self.num_prompt + self.generated

    @property
    def max_context(self) -> int:
        return self.num_prompt + self.max_tokens


def run_chunks(chunks):
    """Pretend the model ran: advance counters and sample one token at the prompt end."""
    for chunk in chunks:
        seq = chunk.sequence
        seq.num_computed = chunk.start + chunk.length
        if seq.num_computed == seq.num_known:
            seq.generated += 1


def make_scheduler(budget_tokens=16, max_running=8, prefill_chunk=8, cache_budget=None):
    cache = CacheManager(load_preset("test-mix"), float_format(load_preset("test-mix"), 4), cache_budget)
    return Scheduler(SchedulerConfig(budget_tokens, max_running, prefill_chunk), cache)


def test_scheduler_imports_no_torch():
    code = ("import sys, dsv4.engine.scheduler, dsv4.engine.cache_manager, dsv4.engine.kv_report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_is_chunked_then_decodes():
    scheduler = make_scheduler(budget_tokens=100, prefill_chunk=8)
    seq = FakeSequence("a", 20)
    scheduler.add(seq)
    spans = []
    for _ in range(5):
        chunks = scheduler.schedule()
        spans.append([(c.start, c.length) for c in chunks])
        run_chunks(chunks)
    assert spans == [[(0, 8)], [(8, 8)], [(16, 4)], [(20, 1)], [(21, 1)]]


def test_decode_goes_before_prefill_and_budget_holds():
    scheduler = make_scheduler(budget_tokens=10, prefill_chunk=8)
    first = FakeSequence("a", 3)
    scheduler.add(first)
    run_chunks(scheduler.schedule())  # a: prompt done, one token sampled
    second = FakeSequence("b", 30)
    scheduler.add(second)
    chunks = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.length) for c in chunks] == [("a", 3, 1), ("b", 0, 8)]
    assert sum(c.length for c in chunks) <= 10


def test_max_running_limits_admission():
    scheduler = make_scheduler(budget_tokens=100, max_running=2)
    for name in "abc":
        scheduler.add(FakeSequence(name, 2))
    chunks = scheduler.schedule()
    assert [c.sequence.request_id for c in chunks] == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_cache_budget_admission_and_release():
    config = load_preset("test-mix")
    one = sum(CacheManager(config, float_format(config, 4)).bytes_for(10).values())
    scheduler = make_scheduler(budget_tokens=100, cache_budget=one + one // 2)
    a, b = FakeSequence("a", 6), FakeSequence("b", 6)
    scheduler.add(a)
    scheduler.add(b)
    chunks = scheduler.schedule()
    assert [c.sequence.request_id for c in chunks] == ["a"]  # b waits for cache room
    assert scheduler.cache.bytes_in_use() == one
    scheduler.finish(a)
    assert scheduler.cache.bytes_in_use() == 0
    assert [c.sequence.request_id for c in scheduler.schedule()] == ["b"]


def test_request_larger_than_budget_raises():
    scheduler = make_scheduler(cache_budget=1000)
    with pytest.raises(CacheFullError, match="cache budget is 1000 bytes"):
        scheduler.add(FakeSequence("big", 50))


def test_remove_releases_cache():
    scheduler = make_scheduler()
    scheduler.add(FakeSequence("a", 4))
    scheduler.schedule()
    assert scheduler.cache.bytes_in_use() > 0
    assert scheduler.remove("a") is not None
    assert scheduler.cache.bytes_in_use() == 0
    assert not scheduler.has_unfinished()


def test_draft_tokens_extend_decode_chunk():
    scheduler = make_scheduler(budget_tokens=100)
    seq = FakeSequence("a", 4)
    scheduler.add(seq)
    run_chunks(scheduler.schedule())
    chunks = scheduler.schedule({"a": 3})
    assert [(c.start, c.length) for c in chunks] == [(4, 4)]
