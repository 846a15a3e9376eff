"""Rendezvous hashing and the endpoint set: stable, balanced, minimal movement; health backoff; DNS discovery."""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pytest

from services.backends.factory import parse_model_urls
from services.backends.routing import EndpointSet, HealthPolicy, parse_endpoints, rendezvous_rank, score

ENDPOINTS = [f"10.0.0.{i}:8001" for i in range(1, 6)]
SESSIONS = [f"session-{i}" for i in range(5000)]


def _homes(endpoints):
    return {s: rendezvous_rank(s, endpoints)[0] for s in SESSIONS}


def test_rank_is_stable_and_independent_of_order():
    for s in SESSIONS[:200]:
        ranked = rendezvous_rank(s, ENDPOINTS)
        assert sorted(ranked) == sorted(ENDPOINTS)
        assert rendezvous_rank(s, list(reversed(ENDPOINTS))) == ranked
    # A fixed value: the hash does not depend on the process (no PYTHONHASHSEED), so every gateway agrees.
    assert rendezvous_rank("session-0", ENDPOINTS) == rendezvous_rank("session-0", ENDPOINTS[::-1])
    assert score("session-0", "10.0.0.1:8001") == int.from_bytes(
        hashlib.blake2b(b"session-0\x0010.0.0.1:8001", digest_size=8).digest(), "big")


def test_sessions_spread_evenly():
    counts = Counter(_homes(ENDPOINTS).values())
    assert set(counts) == set(ENDPOINTS)
    expected = len(SESSIONS) / len(ENDPOINTS)
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts


def test_removing_an_endpoint_moves_only_its_sessions_to_their_second_choice():
    before = _homes(ENDPOINTS)
    lost = ENDPOINTS[2]
    after = _homes([e for e in ENDPOINTS if e != lost])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == lost}
    assert all(after[s] == rendezvous_rank(s, ENDPOINTS)[1] for s in moved)
    # and the moved sessions spread over the others instead of piling onto one
    assert len(set(after[s] for s in moved)) == len(ENDPOINTS) - 1
    # Adding it back returns exactly those sessions.
    assert _homes(ENDPOINTS) == before


def test_parse_endpoints_and_model_urls():
    assert parse_endpoints(" a:1, b:2 ,dns:svc.ns:8001") == ["a:1", "b:2", "dns:svc.ns:8001"]
    for bad in ("", "a", "a:x", "a:0", "a:1,a:1", "dns:svc"):
        with pytest.raises(ValueError, match="Triton endpoint"):
            parse_endpoints(bad)
    assert parse_model_urls("tokenizer=t:1,dynamics=a:1,b:1,lam=l:1") == {"tokenizer": "t:1", "dynamics": "a:1,b:1",
                                                                          "lam": "l:1"}
    assert parse_model_urls("") == {}
    with pytest.raises(ValueError, match="model=host:port"):
        parse_model_urls("a:1,dynamics=b:1")


def test_down_endpoints_are_skipped_until_their_backoff_passes():
    eps = EndpointSet(ENDPOINTS[:3], HealthPolicy(down_s=0.2, max_down_s=0.3))
    key = "s"
    home, second, third = rendezvous_rank(key, ENDPOINTS[:3])
    eps.mark_down(home)
    eps.mark_down(home)  # another call that was in flight fails too: no longer backoff for that
    assert eps._down[home][1] == pytest.approx(0.2)
    assert eps.route(key) == [second, third, home]  # the down one is still tried last
    time.sleep(0.25)
    assert eps.route(key)[0] == home  # its probe: the next call tries it again
    eps.mark_down(home)  # the probe failed: double the backoff, up to max_down_s
    assert eps._down[home][1] == pytest.approx(0.3) and eps.route(key)[0] == second
    eps.mark_up(home)
    assert eps.route(key)[0] == home
    for e in ENDPOINTS[:3]:
        eps.mark_down(e)
    assert sorted(eps.route(key)) == sorted(ENDPOINTS[:3])  # all down: try them all anyway


async def test_dns_names_resolve_to_every_a_record_and_refresh():
    eps = EndpointSet(["dns:localhost:8001", "10.0.0.9:8001"], HealthPolicy(resolve_every_s=3600))
    assert eps.endpoints == ["10.0.0.9:8001"]  # not looked up yet
    assert await eps.refresh() == []
    assert eps.endpoints == ["10.0.0.9:8001", "127.0.0.1:8001"]
    eps._resolved["localhost:8001"] = ["10.0.0.7:8001"]  # as if a pod went away since the last lookup
    eps.mark_down("10.0.0.7:8001")
    assert await eps.refresh() == []  # not due yet
    assert await eps.refresh(force=True) == ["10.0.0.7:8001"]
    assert "10.0.0.7:8001" not in eps._down and eps.endpoints == ["10.0.0.9:8001", "127.0.0.1:8001"]
    bad = EndpointSet(["dns:no-such-host.invalid:8001"])
    await bad.refresh()
    assert bad.endpoints == [] and bad.route("s") == []


@pytest.mark.parametrize("args", [
    ["serve", "--backend", "triton", "--triton-url", "a:1,a:1", "--http-port", "-1", "--metrics-port", "-1"],
    ["serve", "--backend", "triton", "--triton-model-urls", "a:1,dynamics=b:1", "--http-port", "-1"],
    ["rollout", "--backend", "triton", "--triton-url", "dns:svc", "--steps", "1"],
])
def test_bad_endpoints_exit_2_with_one_error_line(args, tmp_path):
    from click.testing import CliRunner

    from services.cli import main

    result = CliRunner().invoke(main, [*args, *(["--out", str(tmp_path / "r.gif")] if args[0] == "rollout" else [])])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Triton" in lines[0], lines


def test_the_gateway_exports_the_routing_counters_on_its_registry():
    from services.gateway.app import Gateway, GatewayConfig
    from services.triton import protocol as P

    gw = Gateway(GatewayConfig(backend="triton", triton_url="127.0.0.1:1",
                               triton_model_urls="dynamics=127.0.0.1:2,127.0.0.1:3", http_port=-1, metrics_port=-1,
                               admission=None))  # the TritonBackend itself, not wrapped by admission control
    assert gw.backend.metrics.registry is gw.service.metrics.registry
    assert [e.specs for e in (gw.backend.endpoints[m] for m in P.MODELS)] == [["127.0.0.1:1"], ["127.0.0.1:1"],
                                                                             ["127.0.0.1:2", "127.0.0.1:3"]]
    gw.backend.metrics.failovers.labels(P.DYNAMICS, "127.0.0.1:2").inc()
    assert gw.service.metrics.registry.get_sample_value(
        "genie_triton_failovers_total", {"model": P.DYNAMICS, "endpoint": "127.0.0.1:2"}) == 1
