"""An asyncio micro-batcher: concurrent single-item calls become one batched call on a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    """Collects items for up to `max_wait_s` (or `max_batch` items) and runs `fn(items)` on `executor`.

    `fn` must return one result per item, in order. If the batched call raises, each item is retried alone,
    so one bad item fails only its own caller. Items submitted while a batch runs form the next batch: under
    load, batches grow by themselves without any waiting.

    The wait is only spent where it can pay: after a batch of one (a lone session, as a player holding a key is),
    the next batch starts as soon as its first item arrives, since waiting would only add latency to every step
    (2 ms x 2 calls per step cost a player ~8% of the frame rate). Once a batch held more than one item, callers
    are concurrent and the next batch waits up to `max_wait_s` for company again.
    """

    def __init__(self, fn: Callable[[Sequence[In]], Sequence[Out]], executor: Executor, max_batch: int = 16,
                 max_wait_s: float = 0.002) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.executor, self.max_batch, self.max_wait_s = fn, executor, max_batch, max_wait_s
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]]] | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many batched calls ran, and their total size: mean batch = items / batches
        self.items = 0
        self.last_size = 0  # the size of the last batch: 1 means no concurrent callers were seen, so no wait

    async def submit(self, item: In) -> Out:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + (self.max_wait_s if self.last_size > 1 else 0.0)
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            self.last_size = len(batch)
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                for (_, fut), result in zip(batch, results, strict=True):
                    _resolve(fut, result=result)
            except Exception as exc:
                if len(batch) == 1:
                    _resolve(batch[0][1], error=exc)
                    continue
                for item, fut in batch:  # isolate the failing item(s): run each alone
                    try:
                        _resolve(fut, result=(await loop.run_in_executor(self.executor, self.fn, [item]))[0])
                    except Exception as one_exc:
                        _resolve(fut, error=one_exc)


def _resolve(fut: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if fut.done():  # the caller gave up (cancelled)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
