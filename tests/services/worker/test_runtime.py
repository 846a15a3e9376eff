"""AsyncRunner: a backend that fails to start is closed, not cached and not leaked (a Celery retry builds another)."""

from __future__ import annotations

import pytest

from services.backends.backend import BackendUnavailable
from services.backends.triton_backend import TritonBackend
from services.triton import free_ports
from services.worker.runtime import AsyncRunner
from services.worker.settings import WorkerSettings


def test_a_backend_that_fails_to_start_is_closed_and_not_kept():
    (port,) = free_ports(1)  # nothing listens there
    made: list[TritonBackend] = []

    def factory() -> TritonBackend:
        made.append(TritonBackend(f"127.0.0.1:{port}", timeout_s=1.0, retries=0))
        return made[-1]

    runner = AsyncRunner()
    settings = WorkerSettings(rollout_backend="triton", triton_url=f"127.0.0.1:{port}")
    try:
        for _ in range(2):  # two deliveries of a task, as Celery retries it
            with pytest.raises(BackendUnavailable):
                runner.backend(settings, "worlds/demo", factory)
        assert len(made) == 2  # the failed one was not cached: the retry tried afresh
        assert all(not b._clients for b in made)  # and each closed its gRPC channels
    finally:
        runner.loop.close()
