"""The in-process backend's threading: every backend of a process runs torch on one shared model thread."""

from __future__ import annotations

import threading

import numpy as np

from services.backends.inprocess import InProcessBackend, model_thread


async def test_backends_share_one_model_thread(trained_world_dir):
    """Two loaded worlds (a catalogue's versions) run their model calls on the same native thread: a second torch
    thread would bring a second OpenMP team onto the same cores and halve both (services/backends/inprocess.py)."""
    ran_on: set[int] = set()
    backends = [InProcessBackend(trained_world_dir) for _ in range(2)]
    for backend in backends:
        await backend.start()
        original = backend.decoder.encode

        def encode(frames, original=original):
            ran_on.add(threading.get_ident())
            return original(frames)

        backend.decoder.encode = encode
    spec = backends[0].spec
    frames = np.zeros((1, spec.height, spec.width, spec.channels), np.uint8)
    for backend in backends:
        assert (await backend.encode(frames)).shape == (1, spec.tokens_per_frame)
    assert len(ran_on) == 1
    assert ran_on == {model_thread().submit(threading.get_ident).result()}
    await backends[0].close()  # closing one leaves the thread to the other
    assert (await backends[1].encode(frames)).shape == (1, spec.tokens_per_frame)
    await backends[1].close()
