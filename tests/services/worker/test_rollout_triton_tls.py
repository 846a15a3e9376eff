"""Rollout workers -> Triton over mutual TLS, all real processes: the session's tritonserver that requires client
certificates (tests/services/conftest.py `tls_triton`), Celery rollout workers configured as the chart configures
them (GENIE_ROLLOUT_BACKEND=triton, GENIE_TRITON_CA/CERT/KEY), jobs submitted through the job API. With the
right certificates the frames equal the in-process rollout's; without a client certificate, or trusting another
CA, the job fails at once with the reason in its status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.worker.specs import RolloutJobSpec
from tests.services.worker.test_jobs import _reference
from tests.tls_certs import make_certs


@pytest.fixture(scope="module")
def tls_env(kit, tls_triton, triton_certs, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("rollout-tls")
    env = kit.env(root / "jobs", GENIE_ROLLOUT_BACKEND="triton", GENIE_TRITON_URL=tls_triton.grpc_url,
                  GENIE_TRITON_CA=str(triton_certs.ca), GENIE_TRITON_CERT=str(triton_certs.client_cert),
                  GENIE_TRITON_KEY=str(triton_certs.client_key))
    return root, env


def _run(kit, root: Path, env: dict[str, str], name: str, spec: RolloutJobSpec, world: Path, timeout: float):
    """Starts a rollout worker with `env`, runs `spec` through the job API, stops the worker; (status, its log)."""
    worker = kit.worker(name, "rollout", {**env, "GENIE_WORKER_METRICS_PORT": str(kit.port())}, root).wait_ready()
    client = kit.client(env)
    try:
        job = client.submit_rollout(spec, world)
        status = client.wait(job, timeout=timeout)
    finally:
        client.close()
        worker.stop(timeout=15)
    # Read after the worker stopped: it logs a task's failure after storing it, so reading at once could miss it.
    return status, worker.log_text()


def test_a_rollout_over_mutual_tls_matches_the_in_process_frames(kit, tls_env, trained_world_dir, tmp_path):
    root, env = tls_env
    prompts = (str(trained_world_dir / "prompts" / "00.png"), str(trained_world_dir / "prompts" / "01.png"))
    spec = RolloutJobSpec(prompts, ((0, 1, 2), (3, 2)), seed=5, chunk_size=2, out=str(tmp_path / "out"))
    status, _ = _run(kit, root, env, "rollout-mtls", spec, trained_world_dir, timeout=120)
    assert status.state == "SUCCESS" and status.done == status.total == 4, status.to_json()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["count"] == 4
    item = spec.items()[3]  # the second chunk's last item: seed 5 + 3
    frames = np.load(tmp_path / "out" / "items" / item.name / "frames.npy")
    assert frames.shape == (1 + len(item.actions), 16, 16, 3)
    # Same code in fp32 on the same CPU: bit for bit the in-process backend's rollout (as the plaintext path).
    expected = _reference_sync(trained_world_dir, item)
    assert np.array_equal(frames, expected.frames)
    assert np.array_equal(np.load(tmp_path / "out" / "items" / item.name / "tokens.npy"), expected.tokens)


def _reference_sync(world: Path, item):
    import asyncio

    return asyncio.run(_reference(world, item))


@pytest.mark.parametrize("case, reason", [
    ("no client certificate", "it refused a client without a certificate (it closed the connection right after the handshake)"),
    ("another CA", "its certificate does not verify with the CA "),
])
def test_wrong_credentials_fail_the_job_with_the_reason(kit, tls_env, tls_triton, trained_world_dir, tmp_path, case, reason):
    root, env = tls_env
    if case == "no client certificate":
        env = {k: v for k, v in env.items() if k not in ("GENIE_TRITON_CERT", "GENIE_TRITON_KEY")}
    else:
        env = {**env, "GENIE_TRITON_CA": str(make_certs(tmp_path / "stranger", name="stranger").ca)}
    spec = RolloutJobSpec((str(trained_world_dir / "prompts" / "00.png"),), ((0, 1),), out=str(tmp_path / "out"))
    status, log = _run(kit, root, env, f"rollout-{case.split()[0]}", spec, trained_world_dir, timeout=60)
    assert status.state == "FAILURE", status.to_json()
    assert f"TLS to Triton at {tls_triton.grpc_url} fails: {reason}" in status.error, status.error
    assert "GENIE_TRITON_CA/CERT/KEY" in status.error
    # Failed at once: a certificate Triton refuses is not retried like a Triton that is down (5 backoffs).
    assert "BackendCredentialsRejected" in log and " retry: " not in log, log[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()
