"""Two real tritonservers behind one TritonBackend: sessions stick to a replica, and survive losing it.

The second server serves the same assembled repository on ports of its own. Each session's steps must land on its
rendezvous home (the backend's per-endpoint counters and each server's own inference counts agree); after one
server is killed with SIGKILL mid-session, its sessions move to the other and step on with frames bit-identical
to a run on one undisturbed server (same seeds, same actions).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio
import torch

from genie.data.synthetic import MovingSprites
from genie.sampling import advance, new_state
from genie.worlds import load_world_config_of
from services.backends.routing import HealthPolicy, rendezvous_rank
from services.backends.triton_backend import TritonBackend
from services.triton import TritonServer, free_ports
from services.triton import protocol as P

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEPS_BEFORE, STEPS_AFTER = 3, 3


@pytest.fixture(scope="module")
def second_server(triton_server, tmp_path_factory):
    """Another tritonserver over the same repository (its own ports and shared-memory names)."""
    log = tmp_path_factory.mktemp("triton-b") / "triton.log"
    server = TritonServer(triton_server.repository, *free_ports(3), log_path=log)
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prompts(trained_world_dir) -> np.ndarray:
    source = MovingSprites(load_world_config_of(trained_world_dir).data.sprites(evaluation=True))
    return np.stack([source.clip(i)[0][:2] for i in range(4)])  # (4, 2, H, W, C)


def _sessions(a: str, b: str, per_server: int = 2) -> list[str]:
    """Session ids, `per_server` of them homed on each of a and b."""
    homes = {a: [], b: []}
    for i in range(100):
        sid = f"replica-{i}"
        home = rendezvous_rank(sid, [a, b])[0]
        if len(homes[home]) < per_server:
            homes[home].append(sid)
    return homes[a] + homes[b]


async def _step(backend, state, action):
    spec = backend.spec
    tokens = await backend.next_tokens(state, action, spec.sampling)
    state = advance(state, torch.from_numpy(tokens), action, spec.window, spec.keep)
    return state, await backend.decode_last(state)


async def _dynamics_count(backend, url) -> int:
    stats = await backend.statistics(P.DYNAMICS, url=url)
    return int(stats["model_stats"][0].get("inference_count", 0))


@pytest_asyncio.fixture(loop_scope="session")
async def reference_backend(triton_server):
    backend = TritonBackend(triton_server.grpc_url, timeout_s=30.0)
    await backend.start()
    yield backend
    await backend.close()


async def test_sessions_stick_to_a_replica_and_move_with_identical_frames(triton_server, second_server, prompts,
                                                                          reference_backend):
    a, b = triton_server.grpc_url, second_server.grpc_url
    sids = _sessions(a, b)
    actions = {sid: [(i + k) % reference_backend.spec.num_actions for k in range(STEPS_BEFORE + STEPS_AFTER)]
               for i, sid in enumerate(sids)}

    # The reference: every session on one undisturbed server.
    reference = {}
    for i, sid in enumerate(sids):
        state = new_state(sid, torch.from_numpy(await reference_backend.encode(prompts[i])), 100 + i)
        frames = []
        for action in actions[sid]:
            state, frame = await _step(reference_backend, state, action)
            frames.append(frame)
        reference[sid] = frames

    # A long down time: once b fails it is skipped for the rest of the test (the re-probe is test_routing's).
    backend = TritonBackend(f"{a},{b}", timeout_s=30.0, health=HealthPolicy(down_s=60.0))
    await backend.start()
    try:
        counts0 = {u: await _dynamics_count(backend, u) for u in (a, b)}
        states = {sid: new_state(sid, torch.from_numpy(await backend.encode(prompts[i])), 100 + i)
                  for i, sid in enumerate(sids)}
        for k in range(STEPS_BEFORE):
            for sid in sids:
                states[sid], frame = await _step(backend, states[sid], actions[sid][k])
                np.testing.assert_array_equal(frame, reference[sid][k])
        # Each session's steps went to its home: 2 sessions x STEPS_BEFORE on each server, by both counts.
        for url in (a, b):
            assert backend.metrics.value("calls", P.DYNAMICS, url) == 2 * STEPS_BEFORE
            assert backend.metrics.value("calls", P.TOKENIZER, url) >= 2 * STEPS_BEFORE  # decode_last; encode spreads
            assert await _dynamics_count(backend, url) - counts0[url] == 2 * STEPS_BEFORE

        second_server.kill()  # SIGKILL: b's K/V caches are gone with it
        for k in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
            for sid in sids:
                states[sid], frame = await _step(backend, states[sid], actions[sid][k])
                np.testing.assert_array_equal(frame, reference[sid][k])  # recomputed from the tokens on a
        assert backend.metrics.value("calls", P.DYNAMICS, a) == 2 * STEPS_BEFORE + 4 * STEPS_AFTER
        assert backend.metrics.value("calls", P.DYNAMICS, b) == 2 * STEPS_BEFORE
        # b failed once per model and was then skipped (marked down), not tried on every step.
        assert backend.metrics.value("failovers", P.DYNAMICS, b) == backend.metrics.value("failovers", P.TOKENIZER, b) == 1
        assert backend.metrics.value("failovers", P.DYNAMICS, a) == 0
        assert await backend.ready()  # a still serves every model
    finally:
        await backend.close()
