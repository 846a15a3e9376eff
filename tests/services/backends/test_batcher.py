"""The micro-batcher: concurrent callers share a batch, a lone caller never waits, a bad item fails alone."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.backends.batcher import MicroBatcher


class Recorder:
    """fn for a MicroBatcher: doubles each item, records the batches; an item < 0 fails whatever batch holds it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, items):
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError("negative item")
        return [2 * i for i in items]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


async def test_concurrent_calls_form_one_batch(executor):
    fn = Recorder()
    batcher = MicroBatcher(fn, executor, max_batch=16, max_wait_s=0.05)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert fn.batches == [[0, 1, 2, 3, 4]]
    await batcher.close()


async def test_max_batch_splits(executor):
    fn = Recorder()
    batcher = MicroBatcher(fn, executor, max_batch=2, max_wait_s=0.05)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert [len(b) for b in fn.batches] == [2, 2, 1]
    await batcher.close()


async def test_lone_caller_does_not_wait(executor):
    """One caller at a time (a player holding a key): each call runs at once, not after max_wait_s."""
    fn = Recorder()
    batcher = MicroBatcher(fn, executor, max_batch=16, max_wait_s=1.0)
    t0 = time.monotonic()
    for i in range(5):
        assert await batcher.submit(i) == 2 * i
    assert time.monotonic() - t0 < 1.0  # five calls, each would have waited 1 s for company
    assert fn.batches == [[i] for i in range(5)]
    await batcher.close()


async def test_after_concurrency_the_batch_waits_for_company(executor):
    """Once callers were concurrent, a batch's first item waits up to max_wait_s for the next one."""
    fn = Recorder()
    batcher = MicroBatcher(fn, executor, max_batch=16, max_wait_s=2.0)
    await asyncio.gather(batcher.submit(0), batcher.submit(1))  # a batch of 2: concurrency seen

    async def late(item: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return await batcher.submit(item)

    assert await asyncio.gather(late(10, 0.0), late(11, 0.2)) == [20, 22]
    assert fn.batches[-1] == [10, 11]
    await batcher.close()


async def test_a_failing_item_fails_only_its_caller(executor):
    fn = Recorder()
    batcher = MicroBatcher(fn, executor, max_batch=16, max_wait_s=0.05)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(-1), batcher.submit(3), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)
    assert await batcher.submit(4) == 8  # the batcher goes on
    await batcher.close()
