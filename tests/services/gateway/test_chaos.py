"""A short chaos soak (benchmarks/chaos.py runs the long one): two `genie serve` processes on a Sentinel-backed
Redis and a real tritonserver, sessions stepping from retrying clients while a gateway, the Redis master and
the Triton server are each kill -9'd once. Nothing acknowledged is lost, no session is corrupted, no step
number is doubled, and every fault heals."""

from __future__ import annotations

import math

from harness.chaos import ChaosConfig, run_chaos


async def test_kill_a_gateway_the_redis_master_and_triton_and_lose_nothing(trained_world_dir, tmp_path):
    cfg = ChaosConfig(world=trained_world_dir, root=tmp_path, sessions=8, duration_s=45, kills=1, think_s=0.1)
    r = await run_chaos(cfg)
    summary = r.to_dict()
    # A string, not the dict: pytest would shorten a dict's repr, and the errors by code are what tells a cause.
    assert (r.lost, r.corrupted, r.duplicates, r.gave_up) == (0, 0, 0, 0), f"{summary}; gateway logs in {tmp_path}"
    assert set(r.faults) == {"gateway", "redis", "triton"}, summary
    assert all(math.isfinite(h) for heals in r.faults.values() for h in heals), f"a fault never healed: {summary}"
    assert r.errors, f"the faults were felt by the clients (and ridden through): {summary}"
    assert r.steps_acked > 8 * 20, summary
