"""A world catalogue behind Triton: two gateways over one Redis and one Triton with explicit model control. Sessions
on version 1 play on, bit for bit, while version 2 is published and loaded into the running Triton; nothing restarts;
a version one gateway unloads under its models budget loads again when a session on it steps."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from tritonclient.grpc import aio as triton_aio

from genie.catalog import DirectoryCatalog
from genie.worlds import load_prompts
from services.backends.worlds import weights_bytes
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.sessions import Limits
from services.gateway.stores.redis_store import RedisStore
from services.triton import TritonServer, free_ports
from services.triton.launcher import explicit_repository
from services.triton.protocol import version_model_name

ALICE = "alice-token-0123456789"
ACTIONS = [1, 3, 0, 2, 1, 1]
SESSIONS = 16


def _changed_world(world: Path, to: Path) -> Path:
    """A copy of `world` whose dynamics weights differ: another version of it, with other frames."""
    shutil.copytree(world, to)
    path = to / "dynamics" / "model.safetensors"
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    return to


@pytest.fixture(scope="module")
def explicit_triton(tmp_path_factory):
    """A tritonserver with explicit model control that starts with no model (`genie triton serve --explicit`)."""
    root = tmp_path_factory.mktemp("triton-explicit")
    server = TritonServer(explicit_repository(root), *free_ports(3), log_path=root / "triton.log")
    server.start()
    server.wait_ready(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def registry(trained_world_dir, tmp_path) -> DirectoryCatalog:
    catalog = DirectoryCatalog(tmp_path / "registry")
    catalog.publish(trained_world_dir, "tiny")
    return catalog


async def _gateway(catalog: DirectoryCatalog, triton: TritonServer, redis_url: str, prefix: str, **kw) -> Gateway:
    cfg = GatewayConfig(registry=str(catalog.root), backend="triton", triton_url=triton.grpc_url, grpc_port=0,
                        http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}", store="redis", redis_url=redis_url,
                        limits=Limits(max_sessions_per_client=64, requests_per_second=10_000), **kw)
    gw = Gateway(cfg, store=RedisStore(redis_url, prefix=prefix))
    await gw.start()
    return gw


async def _triton_models(triton: TritonServer, world: str = "tiny") -> set[str]:
    """Which models of versions 1 and 2 of `world` the Triton has ready."""
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    try:
        return {name for name in _names(world, 1) | _names(world, 2) if await client.is_model_ready(name)}
    finally:
        await client.close()


def _names(world: str, version: int) -> set[str]:
    return {version_model_name(kind, world, version) for kind in ("tokenizer", "lam", "dynamics")}


async def test_sixteen_sessions_play_on_while_a_version_is_published_into_a_running_triton(
        registry, trained_world_dir, tmp_path, explicit_triton, redis_url):
    prefix = f"genie-cat-{uuid.uuid4().hex[:8]}:"
    a = await _gateway(registry, explicit_triton, redis_url, prefix)
    b = await _gateway(registry, explicit_triton, redis_url, prefix)
    pid = explicit_triton.process.pid
    try:
        async with GatewayClient(a.grpc_address, ALICE) as ca, GatewayClient(b.grpc_address, ALICE) as cb:
            clients = [ca, cb]
            image = load_prompts(trained_world_dir)[0].read_bytes()
            v1 = registry.resolve("tiny", 1)
            # 16 sessions that play through the publish, and 16 twins (same prompt and seed) played only after it.
            played = [(await clients[i % 2].open(image=image, seed=i, world="tiny")).session for i in range(SESSIONS)]
            twins = [(await clients[i % 2].open(image=image, seed=i, world="tiny@1")).session for i in range(SESSIONS)]
            assert {s.world for s in played + twins} == {"tiny@1"} and {s.world_digest for s in played} == {v1.digest}
            assert _names("tiny", 1) <= await _triton_models(explicit_triton)

            frames: dict[str, list[np.ndarray]] = {s.session_id: [] for s in played}

            async def play(k: int, steps: range) -> None:
                """Session k's steps, alternating gateways: any replica serves any step."""
                sid = played[k].session_id
                for j in steps:
                    reply = await clients[(k + j) % 2].step(sid, ACTIONS[j])
                    frames[sid].append(frame_array(reply.frame))

            await asyncio.gather(*(play(k, range(0, 2)) for k in range(SESSIONS)))
            publish = asyncio.create_task(asyncio.to_thread(
                registry.publish, _changed_world(trained_world_dir, tmp_path / "v2"), "tiny"))
            await asyncio.gather(*(play(k, range(2, 4)) for k in range(SESSIONS)), publish)  # steps during the publish
            v2 = publish.result()
            # New sessions, on either gateway, get version 2: its models load into the running Triton.
            fresh = (await cb.open(image=image, seed=0, world="tiny")).session
            assert (fresh.world, fresh.world_digest) == ("tiny@2", v2.digest)
            assert (await ca.step(fresh.session_id, ACTIONS[0])).step == 1
            assert _names("tiny", 2) | _names("tiny", 1) <= await _triton_models(explicit_triton)
            await asyncio.gather(*(play(k, range(4, len(ACTIONS))) for k in range(SESSIONS)))

            for k, twin in enumerate(twins):  # the undisturbed run: version 1, stepped after everything
                expected = [frame_array((await clients[k % 2].step(twin.session_id, act)).frame) for act in ACTIONS]
                got = frames[played[k].session_id]
                assert len(got) == len(ACTIONS)  # 0 failed steps
                for x, y in zip(got, expected, strict=True):
                    np.testing.assert_array_equal(x, y)  # 0 changed steps
        assert explicit_triton.process.pid == pid and explicit_triton.running  # nothing restarted
    finally:
        await a.stop()
        await b.stop()


async def test_a_version_unloaded_by_one_gateway_loads_again_for_another(registry, trained_world_dir, tmp_path,
                                                                      explicit_triton, redis_url):
    """Gateway A's budget holds one version: opening v2 unloads idle v1 from Triton. Gateway B's session on v1 steps
    on: its call finds the models gone, loads them again and gives the same frames as before the unload."""
    prefix = f"genie-cat-{uuid.uuid4().hex[:8]}:"
    registry.publish(_changed_world(trained_world_dir, tmp_path / "v2"), "tiny")
    one_version = weights_bytes(registry.resolve("tiny", 1).path) + 1024
    a = await _gateway(registry, explicit_triton, redis_url, prefix, models_budget_bytes=one_version)
    b = await _gateway(registry, explicit_triton, redis_url, prefix)
    try:
        async with GatewayClient(a.grpc_address, ALICE) as ca, GatewayClient(b.grpc_address, ALICE) as cb:
            image = load_prompts(trained_world_dir)[0].read_bytes()
            on_v1 = (await cb.open(image=image, seed=3, world="tiny@1")).session
            twin = (await cb.open(image=image, seed=3, world="tiny@1")).session
            first = [frame_array((await cb.step(on_v1.session_id, act)).frame) for act in ACTIONS[:3]]

            async with GatewayClient(a.grpc_address, ALICE) as probe:  # A loads v1, then v2 evicts it (A is idle on v1)
                s1 = (await probe.open(image=image, seed=1, world="tiny@1")).session
                await probe.close(s1.session_id)
                await ca.open(image=image, seed=1, world="tiny@2")
            assert a.worlds.loaded().keys() == {"tiny@2"}
            assert not _names("tiny", 1) & await _triton_models(explicit_triton)  # gone from Triton

            rest = [frame_array((await cb.step(on_v1.session_id, act)).frame) for act in ACTIONS[3:]]  # B reloads
            stepping = {version_model_name(kind, "tiny", 1) for kind in ("tokenizer", "dynamics")}
            assert stepping <= await _triton_models(explicit_triton)  # what a step calls is back (the LAM on demand)
            expected = [frame_array((await cb.step(twin.session_id, act)).frame) for act in ACTIONS]
            for x, y in zip(first + rest, expected, strict=True):
                np.testing.assert_array_equal(x, y)
    finally:
        await a.stop()
        await b.stop()


async def test_a_version_that_fails_to_load_is_refused_whole(registry, trained_world_dir, explicit_triton, redis_url):
    """Triton refuses the tokenizer and dynamics of a version (a K/V budget too small for one batch): opening a
    session answers UNAVAILABLE saying so, and the LAM that did load is unloaded again: never half-served."""
    prefix = f"genie-cat-{uuid.uuid4().hex[:8]}:"
    registry.publish(trained_world_dir, "small")  # a name no other test loaded
    gw = await _gateway(registry, explicit_triton, redis_url, prefix, cache_bytes=1)
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.open(image=load_prompts(trained_world_dir)[0].read_bytes(), seed=0, world="small@1")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not load small.v1." in err.value.details()
        assert not _names("small", 1) & await _triton_models(explicit_triton, "small")
    finally:
        await gw.stop()


async def test_a_model_of_the_same_name_from_another_catalogue_is_replaced(registry, trained_world_dir, tmp_path,
                                                                           explicit_triton, redis_url):
    """Triton holds tiny.v1.* of one catalogue; a gateway on another catalogue whose tiny@1 has other files loads its
    own over them (the config carries the digest), instead of serving the wrong world under the right name."""
    prefix = f"genie-cat-{uuid.uuid4().hex[:8]}:"
    other = DirectoryCatalog(tmp_path / "other")
    mine = other.publish(_changed_world(trained_world_dir, tmp_path / "changed"), "tiny")
    image = load_prompts(trained_world_dir)[0].read_bytes()
    for catalog, digest in ((registry, registry.resolve("tiny", 1).digest), (other, mine.digest)):
        gw = await _gateway(catalog, explicit_triton, redis_url, prefix)
        try:
            async with GatewayClient(gw.grpc_address, ALICE) as client:
                session = (await client.open(image=image, seed=0, world="tiny@1")).session
                assert session.world_digest == digest
                await client.step(session.session_id, 0)
        finally:
            await gw.stop()
        triton = triton_aio.InferenceServerClient(explicit_triton.grpc_url)
        try:
            config = await triton.get_model_config(version_model_name("dynamics", "tiny", 1), as_json=True)
        finally:
            await triton.close()
        assert config["config"]["parameters"]["world_digest"]["string_value"] == digest


async def test_a_rollout_worker_backend_for_a_version_matches_the_in_process_one(registry, explicit_triton):
    """What a Triton rollout worker builds for a job pinned to a catalogue version (make_backend with the version:
    services/worker/tasks.py) loads that version into the explicit Triton and rolls out the frames the in-process
    backend of the same version gives."""
    from genie.media import load_image
    from services.backends.factory import BackendConfig, make_backend
    from services.rollout import rollout_trace

    entry = registry.resolve("tiny", 1)
    traces = []
    for cfg in (BackendConfig(backend="triton", triton_url=explicit_triton.grpc_url), BackendConfig()):
        backend = make_backend(cfg, version=entry)
        await backend.start()
        try:
            spec = backend.spec
            prompt = load_image(load_prompts(entry.path)[0], spec.height, spec.width)[None]
            traces.append(await rollout_trace(backend, prompt, [1, 2, 3, 0], seed=7))
        finally:
            await backend.close()
    np.testing.assert_array_equal(traces[0].frames, traces[1].frames)
    np.testing.assert_array_equal(traces[0].tokens, traces[1].tokens)


async def test_the_servers_own_budget_unloads_idle_versions_least_recently_used_first(
        registry, trained_world_dir, tmp_path, explicit_triton):
    """`genie triton serve --explicit --models-budget-mb`: versions that gateways left loaded are unloaded, least
    recently used first, until the loaded checkpoints fit; a version in play (used within idle_s) never is."""
    from tritonclient.http import InferenceServerClient as HttpClient

    from services.backends.triton_backend import TritonBackend
    from services.backends.triton_catalogue import VersionModels
    from services.triton.budget import LoadedVersion, ModelsBudget

    url = explicit_triton.http_url.removeprefix("http://")
    http = HttpClient(url)
    ModelsBudget(url, 1, idle_s=0).sweep(http)  # a clean slate: what the module's other tests left loaded goes
    old = registry.publish(_changed_world(trained_world_dir, tmp_path / "a"), "swept")
    new = registry.publish(_changed_world(trained_world_dir, tmp_path / "b"), "swept")
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    backends = {}
    for entry in (old, new):  # both loaded; only the newer one used since
        backends[entry.ref] = TritonBackend(explicit_triton.grpc_url, models=VersionModels(entry), timeout_s=30.0)
        await backends[entry.ref].start()
    await backends[new.ref].encode(frames)
    try:
        assert set(ModelsBudget(url, 1).loaded(http)) == {"swept.v1", "swept.v2"}
        budget = ModelsBudget(url, weights_bytes(new.path) + 1024, idle_s=0)
        loaded = budget.loaded(http)
        assert set(loaded) == {"swept.v1", "swept.v2"} and loaded["swept.v1"].bytes == weights_bytes(old.path)
        assert budget.sweep(http) == ["swept.v1"]  # the least recently used goes; then the rest fits
        assert set(budget.loaded(http)) == {"swept.v2"}
        await backends[old.ref].encode(frames)  # a session on it comes back: it loads again, and is in play
        for _ in range(100):  # Triton counts an inference in its statistics a moment after it answers
            if budget.loaded(http).get("swept.v1", LoadedVersion([], 0, 0.0)).last_used > 0:
                break
            await asyncio.sleep(0.05)
        in_play = ModelsBudget(url, 1, idle_s=3600)
        assert in_play.sweep(http) == [] and set(in_play.loaded(http)) == {"swept.v1", "swept.v2"}
    finally:
        http.close()
        for backend in backends.values():
            await backend.unload_models()
            await backend.close()
