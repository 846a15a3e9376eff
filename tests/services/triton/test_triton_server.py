"""The Triton services for real: repository layout, the pbtxt contract, bad requests alone in a batch, outage and recovery."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genie.data.synthetic import MovingSprites
from genie.sampling import new_state
from genie.spec import WorldSpec, world_spec
from genie.worlds import load_world_config_of
from services.backends.backend import BackendUnavailable
from services.backends.triton_backend import TritonBackend, _step_inputs, _tensor, _window
from services.triton import assemble_repository, free_ports
from services.triton import protocol as P
from services.triton.launcher import SERVICES_DIR

INPUTS = {P.TOKENIZER: {*P.ENCODE_INPUTS, *P.DECODE_INPUTS}, P.LAM: set(P.LAM_INPUTS),
          P.DYNAMICS: {*P.DYNAMICS_INPUTS, *P.DYNAMICS_OPTIONAL_INPUTS}}
OUTPUTS = {P.TOKENIZER: {P.TOKENS, P.FRAME}, P.LAM: {P.LATENT_ACTIONS}, P.DYNAMICS: {P.NEXT_TOKENS}}


def _config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", P.MODELS)
def test_pbtxt_declares_the_protocol_and_batches(name):
    config = _config(SERVICES_DIR / name / "config.pbtxt")
    assert (config.name, config.backend) == (name, "python")
    assert {i.name for i in config.input} == INPUTS[name] and {o.name for o in config.output} == OUTPUTS[name]
    if name == P.DYNAMICS:  # inputs older clients do not send are optional, so their requests still load
        assert {i.name for i in config.input if i.optional} == set(P.DYNAMICS_OPTIONAL_INPUTS)
    assert config.max_batch_size > 1 and config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 5000
    assert set(os.listdir(SERVICES_DIR / name)) == {"1", "config.pbtxt"}  # a model dir is the pbtxt and 1/model.py
    assert set(os.listdir(SERVICES_DIR / name / "1")) - {"__pycache__"} == {"model.py"}


def test_repository_layout(trained_world_dir, tmp_path):
    repo = assemble_repository(trained_world_dir, tmp_path / "repo", threads=2, cache_bytes=12345, instances=2)
    assert sorted(os.listdir(repo.models)) == sorted(P.MODELS)
    for name in P.MODELS:
        assert (repo.models / name / "1" / "model.py").read_text() == (SERVICES_DIR / name / "1" / "model.py").read_text()
        config = _config(repo.models / name / "config.pbtxt")
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params[P.PARAM_WORLD_DIR] == str(trained_world_dir.resolve()) and params[P.PARAM_THREADS] == "2"
        assert [g.count for g in config.instance_group] == [2]
    params = {k: v.string_value for k, v in _config(repo.models / P.DYNAMICS / "config.pbtxt").parameters.items()}
    assert params[P.PARAM_CACHE_BYTES] == "12345"
    cfg = load_world_config_of(trained_world_dir)
    assert WorldSpec.from_dict(json.loads(params[P.PARAM_WORLD_SPEC])) == world_spec(cfg)
    lam = _config(repo.models / P.LAM / "config.pbtxt")
    assert lam.parameters[P.PARAM_MAX_FRAMES].string_value == str(cfg.lam.max_frames)
    backend = repo.backends / "python"
    assert sorted(os.listdir(backend)) == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert os.access(backend / "triton_python_backend_stub", os.X_OK)
    # Re-assembling into the same place replaces it cleanly.
    assert assemble_repository(trained_world_dir, tmp_path / "repo").models == repo.models


@pytest.fixture(scope="module")
def prompt(trained_world_dir) -> np.ndarray:
    return MovingSprites(load_world_config_of(trained_world_dir).data.sprites(evaluation=True)).clip(20)[0]  # (T, H, W, C)


@pytest.mark.asyncio(loop_scope="session")
async def test_bad_requests_fail_alone_and_batch_mates_succeed(triton_backend, prompt):
    """Requests that skip client validation reach the models: each bad one gets INVALID_ARG, the rest answer."""
    b, spec = triton_backend, triton_backend.spec
    state = new_state("mates", torch.from_numpy(await b.encode(prompt[:2])), 3)
    good = _step_inputs(state, 1, spec.sampling, spec.window)
    bad = {
        "out of range": _step_inputs(state, spec.num_actions + 3, spec.sampling, spec.window),
        "WINDOW_TOKENS out of range": _step_inputs(replace(state, tokens=state.tokens + spec.num_codes), 1, spec.sampling,
                                                   spec.window),
    }
    bad["unknown schedule"] = [_tensor(P.SCHEDULE, np.array(b"zigzag", dtype=object)) if i.name() == P.SCHEDULE else i
                               for i in _step_inputs(state, 1, spec.sampling, spec.window)]
    calls = [good, *bad.values(), good]
    results = await asyncio.gather(*(b._infer(P.DYNAMICS, c, P.NEXT_TOKENS) for c in calls), return_exceptions=True)
    expected = await b.next_tokens(state, 1, spec.sampling)
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[-1], expected)
    for (what, _), result in zip(bad.items(), results[1:-1], strict=True):
        assert isinstance(result, ValueError) and what in str(result) and "'dynamics'" in str(result), (what, result)
    # The tokenizer too: neither encode nor decode inputs, and a frame count beyond what was sent.
    with pytest.raises(ValueError, match="to encode or"):
        await b._infer(P.TOKENIZER, [_tensor(P.NUM_FRAMES, np.int32(1))], P.TOKENS)
    window = _window(state, spec.window)
    window[1] = _tensor(P.NUM_FRAMES, np.int32(spec.window + 1))
    with pytest.raises(ValueError, match="NUM_FRAMES"):
        await b._infer(P.TOKENIZER, window, P.FRAME)
    assert await b.ready()
    np.testing.assert_array_equal(await b.next_tokens(state, 1, spec.sampling), expected)


@pytest.mark.asyncio(loop_scope="session")
async def test_no_server_means_backend_unavailable_quickly():
    (port,) = free_ports(1)
    backend = TritonBackend(f"127.0.0.1:{port}", timeout_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        await backend.start()
    assert time.monotonic() - t0 < 3.0
    assert not await backend.ready()
    await backend.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_server_down_then_back_the_backend_recovers_by_itself(triton_server, triton_backend, prompt):
    b, spec = triton_backend, triton_backend.spec
    state = new_state("outage", torch.from_numpy(await b.encode(prompt[:3])), 5)
    before = await b.next_tokens(state, 2, spec.sampling)
    triton_server.kill()  # a crash: no graceful unload
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as err:
            await b.next_tokens(state, 2, spec.sampling)
        assert time.monotonic() - t0 < 3.0
        assert triton_server.grpc_url in str(err.value) and "'dynamics'" in str(err.value)
        with pytest.raises(BackendUnavailable, match="'tokenizer'"):
            await b.decode_last(state)
        assert not await b.ready()
    finally:
        triton_server.start()
        triton_server.wait_ready(timeout=120)
    # The same client, no restart: the channel reconnects; the K/V cache is gone and the recomputed step is identical.
    np.testing.assert_array_equal(await b.next_tokens(state, 2, spec.sampling), before)
    assert await b.ready()


def test_repository_of_one_model(trained_world_dir, tmp_path):
    """The Helm chart runs one Triton Deployment per model: each repository holds just that model."""
    repo = assemble_repository(trained_world_dir, tmp_path / "repo", models=[P.DYNAMICS])
    assert os.listdir(repo.models) == [P.DYNAMICS]
    with pytest.raises(ValueError, match="models must be some of"):
        assemble_repository(trained_world_dir, tmp_path / "bad", models=["decoder"])


async def test_each_model_is_called_at_its_own_url(triton_server):
    """Per-model URLs route each call to its own server (the chart's layout); one dead server fails by name."""
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    backend = TritonBackend(triton_server.grpc_url, timeout_s=30.0, model_urls={P.TOKENIZER: dead})
    assert backend.urls == {P.TOKENIZER: dead, P.LAM: triton_server.grpc_url, P.DYNAMICS: triton_server.grpc_url}
    with pytest.raises(BackendUnavailable, match=f"'tokenizer' at {dead}"):
        await backend.start()  # start() checks that every model is ready
    await backend.close()
    explicit = TritonBackend("127.0.0.1:1", timeout_s=30.0, model_urls={m: triton_server.grpc_url for m in P.MODELS})
    await explicit.start()  # the default URL is dead, but no model uses it
    try:
        tokens = await explicit.encode(np.zeros((1, explicit.spec.height, explicit.spec.width, 3), np.uint8))
        assert tokens.shape == (1, explicit.spec.tokens_per_frame)
    finally:
        await explicit.close()
    with pytest.raises(ValueError, match="unknown Triton models"):
        TritonBackend(triton_server.grpc_url, model_urls={"decoder": dead})
