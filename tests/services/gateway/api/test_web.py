"""The web JSON API (services/gateway/api/web.py) against a real SessionService over the tiny trained world."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from genie.worlds import load_prompts
from services.backends.inprocess import InProcessBackend
from services.gateway.api.web import SERVICE, create_web_app
from services.gateway.security.auth import Authenticator
from services.gateway.sessions import Limits, SessionService
from services.gateway.stores.memory_store import MemoryStore

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789abc"
MAX_PROMPT = 64 << 10  # a small body limit keeps the oversized-body tests cheap

pytestmark = pytest.mark.asyncio


def auth(token: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def service_of(client: TestClient) -> SessionService:
    return client.app[SERVICE]  # the tests peek at the service and store behind the API


def frame_of(reply: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(reply["frame"]))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@asynccontextmanager
async def serve(world_dir: Path, limits: Limits | None = None, backend=None) -> AsyncIterator[TestClient]:
    backend = backend or InProcessBackend(world_dir)
    if isinstance(backend, InProcessBackend):
        await backend.start()
    limits = limits or Limits(max_prompt_bytes=MAX_PROMPT, requests_per_second=10_000)
    service = SessionService(backend, MemoryStore(), Authenticator({ALICE: "alice", BOB: "bob"}), limits)
    try:
        async with TestClient(TestServer(create_web_app(service, world_dir))) as client:
            yield client
    finally:
        await backend.close()


@pytest_asyncio.fixture
async def client(trained_world_dir) -> AsyncIterator[TestClient]:
    async with serve(trained_world_dir) as client:
        yield client


async def open_session(client: TestClient, **body) -> dict:
    resp = await client.post("/api/sessions", json={"prompt": 0, "seed": 7} | body, headers=auth())
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def expect_error(resp, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["code"] == code and body["message"], body
    return body["message"]


async def test_page_static_and_health_need_no_token(client):
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "/static/play.js" in page and "/static/play.css" in page
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]  # nothing loads from elsewhere
    for name, kind in [("play.js", "javascript"), ("play.css", "text/css")]:
        resp = await client.get(f"/static/{name}")
        assert resp.status == 200 and kind in resp.content_type
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_world_and_prompts(client, trained_world_dir):
    spec = service_of(client).spec
    resp = await client.get("/api/world", headers=auth())
    assert resp.status == 200
    world = await resp.json()
    assert world["actions"] == [{"id": a, "name": spec.action_name(a)} for a in range(spec.num_actions)]
    assert world["keys"] == [{"key": k, "action": None, "share": None} for k in ("left", "right", "up", "down")]
    assert (world["height"], world["width"], world["window"]) == (spec.height, spec.width, spec.window)
    prompts = load_prompts(trained_world_dir)
    assert world["prompts"] == len(prompts) > 0

    resp = await client.get("/api/prompts/1", headers=auth())
    assert resp.status == 200 and resp.content_type == "image/png"
    assert await resp.read() == prompts[1].read_bytes()
    await expect_error(await client.get(f"/api/prompts/{len(prompts)}", headers=auth()), 404, "NOT_FOUND")
    await expect_error(await client.get("/api/prompts/first", headers=auth()), 400, "INVALID_ARGUMENT")


async def test_open_from_prompt_then_step_get_and_close(client):
    opened = await open_session(client)
    assert opened["step"] == 0 and frame_of(opened).shape == (16, 16, 3)
    sid = opened["session_id"]

    frames = [frame_of(opened)]
    for step, action in enumerate([1, 0, 2], start=1):
        resp = await client.post(f"/api/sessions/{sid}/step", json={"action": action}, headers=auth())
        assert resp.status == 200, await resp.text()
        reply = await resp.json()
        assert (reply["session_id"], reply["step"], reply["action"]) == (sid, step, action)
        assert reply["action_name"] == service_of(client).spec.action_name(action)
        frames.append(frame_of(reply))
    assert any(not np.array_equal(frames[0], f) for f in frames[1:]), "stepping never changed the frame"

    info = await (await client.get(f"/api/sessions/{sid}", headers=auth())).json()
    assert info["session_id"] == sid and info["step"] == 3 and info["version"] == 3
    assert info["expires"] > info["created"]

    resp = await client.delete(f"/api/sessions/{sid}", headers=auth())
    assert resp.status == 200 and (await resp.json())["closed"] is True
    await expect_error(await client.get(f"/api/sessions/{sid}", headers=auth()), 404, "NOT_FOUND")
    await expect_error(await client.post(f"/api/sessions/{sid}/step", json={"action": 0}, headers=auth()), 404, "NOT_FOUND")


async def test_steps_sent_before_the_last_reply_run_one_after_another(client):
    """A page holding a key keeps two steps of one session in flight: the gateway runs them in turn (consecutive step
    numbers, no commit conflict, no frame computed twice) and frees its per-session lock afterwards."""
    import asyncio

    service = service_of(client)
    sid = (await open_session(client))["session_id"]
    conflicts = service.metrics.commit_conflicts._value.get()
    replies = await asyncio.gather(*(client.post(f"/api/sessions/{sid}/step", json={"action": 1}, headers=auth())
                                     for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    steps = sorted([(await r.json())["step"] for r in replies])
    assert steps == [1, 2, 3, 4]
    assert service.metrics.commit_conflicts._value.get() == conflicts
    assert service._stepping == {}  # nothing left behind per session


async def test_same_prompt_and_seed_give_the_same_frames(client):
    a, b = await open_session(client, seed=11), await open_session(client, seed=11)
    for reply in (a, b):
        resp = await client.post(f"/api/sessions/{reply['session_id']}/step", json={"action": 2}, headers=auth())
        reply["next"] = frame_of(await resp.json())
    assert np.array_equal(frame_of(a), frame_of(b)) and np.array_equal(a["next"], b["next"])


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
async def test_open_from_uploaded_image(client, kind):
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(48, 32))).save(buf, format=kind)
    resp = await client.post("/api/sessions?seed=5&steps=2&temperature=0.5", data=buf.getvalue(),
                             headers=auth() | {"Content-Type": f"image/{kind.lower()}"})
    assert resp.status == 201, await resp.text()
    opened = await resp.json()
    assert opened["step"] == 0 and frame_of(opened).shape == (16, 16, 3)
    info = await (await client.get(f"/api/sessions/{opened['session_id']}", headers=auth())).json()
    assert info["sampling"] == {"steps": 2, "temperature": 0.5}


async def test_other_clients_session_is_not_found(client):
    sid = (await open_session(client))["session_id"]
    await expect_error(await client.get(f"/api/sessions/{sid}", headers=auth(BOB)), 404, "NOT_FOUND")
    await expect_error(await client.post(f"/api/sessions/{sid}/step", json={"action": 0}, headers=auth(BOB)), 404, "NOT_FOUND")
    await expect_error(await client.delete(f"/api/sessions/{sid}", headers=auth(BOB)), 404, "NOT_FOUND")
    resp = await client.post(f"/api/sessions/{sid}/step", json={"action": 0}, headers=auth())
    assert resp.status == 200 and (await resp.json())["step"] == 1  # the owner's session is untouched


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {ALICE}"},
                                     {"Authorization": "Bearer"}])
@pytest.mark.parametrize("method,path", [("GET", "/api/world"), ("GET", "/api/prompts/0"), ("POST", "/api/sessions"),
                                         ("GET", "/api/sessions/abc"), ("POST", "/api/sessions/abc/step"),
                                         ("DELETE", "/api/sessions/abc")])
async def test_missing_or_bad_token_is_401(client, headers, method, path):
    resp = await client.request(method, path, json={"prompt": 0, "action": 0}, headers=headers)
    message = await expect_error(resp, 401, "UNAUTHENTICATED")
    assert ALICE not in message


@pytest.mark.parametrize("body,needle", [
    ({"action": 99}, "unknown action"),
    ({"action": -1}, "unknown action"),
    ({"action": "left"}, "integer"),
    ({"action": 1.5}, "integer"),
    ({"action": True}, "integer"),
    ({}, "action"),
    ([0], "JSON object"),
])
async def test_bad_step_is_400_and_changes_nothing(client, body, needle):
    sid = (await open_session(client))["session_id"]
    message = await expect_error(await client.post(f"/api/sessions/{sid}/step", json=body, headers=auth()), 400, "INVALID_ARGUMENT")
    assert needle in message
    assert (await (await client.get(f"/api/sessions/{sid}", headers=auth())).json())["step"] == 0


@pytest.mark.parametrize("data,content_type,needle", [
    (b"{not json", "application/json", "not valid JSON"),
    (b"\xff\xfe", "application/json", "not valid JSON"),
    (b'{"seed": 1}', "application/json", "prompt"),
    (b'{"prompt": 99}', "application/json", "no prompt 99"),
    (b'{"prompt": 0, "steps": 1000}', "application/json", "sampling steps"),
    (b'{"prompt": 0, "temperature": "hot"}', "application/json", "temperature"),
    (b'{"prompt": 0, "seed": -1}', "application/json", "seed"),
    (b"prompt=0", "application/x-www-form-urlencoded", "Content-Type"),
    (b"", "image/png", "empty"),
])
async def test_bad_open_is_400(client, data, content_type, needle):
    resp = await client.post("/api/sessions", data=data, headers=auth() | {"Content-Type": content_type})
    assert needle in await expect_error(resp, 400, "INVALID_ARGUMENT")
    assert await service_of(client).store.count("alice") == 0


async def test_corrupt_image_is_400_and_the_session_still_steps(client):
    sid = (await open_session(client))["session_id"]
    corrupt = png()[:60] + b"\x00" * 200  # a valid PNG header, then garbage
    for data in (corrupt, b"definitely not an image"):
        resp = await client.post("/api/sessions", data=data, headers=auth() | {"Content-Type": "image/png"})
        assert "cannot read the prompt image" in await expect_error(resp, 400, "INVALID_ARGUMENT")
    assert await service_of(client).store.count("alice") == 1
    resp = await client.post(f"/api/sessions/{sid}/step", json={"action": 1}, headers=auth())
    assert resp.status == 200 and (await resp.json())["step"] == 1


async def test_oversized_bodies_are_refused(client):
    headers = auth() | {"Content-Type": "image/png"}
    over_server_cap = png()[:8] + b"\x00" * (MAX_PROMPT + (256 << 10))
    assert "too large" in await expect_error(await client.post("/api/sessions", data=over_server_cap, headers=headers),
                                             413, "INVALID_ARGUMENT")
    over_prompt_limit = png()[:8] + b"\x00" * MAX_PROMPT  # under aiohttp's cap, over the service's limit
    assert "bytes, over" in await expect_error(await client.post("/api/sessions", data=over_prompt_limit, headers=headers),
                                               400, "INVALID_ARGUMENT")
    assert await service_of(client).store.count("alice") == 0


async def test_unknown_session_and_route_are_json_404(client):
    await expect_error(await client.get("/api/sessions/0123456789abcdef", headers=auth()), 404, "NOT_FOUND")
    await expect_error(await client.post("/api/sessions/0123456789abcdef/step", json={"action": 0}, headers=auth()),
                       404, "NOT_FOUND")
    await expect_error(await client.get(f"/api/sessions/{'x' * 65}", headers=auth()), 400, "INVALID_ARGUMENT")
    await expect_error(await client.get("/api/nothing-here", headers=auth()), 404, "NOT_FOUND")
    await expect_error(await client.get("/static/../web.py"), 404, "NOT_FOUND")


async def test_unexpected_failure_is_json_500_without_traceback(client, monkeypatch):
    sid = (await open_session(client))["session_id"]

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service_of(client), "step", broken)
    resp = await client.post(f"/api/sessions/{sid}/step", json={"action": 0}, headers=auth())
    message = await expect_error(resp, 500, "INTERNAL")
    assert "secret" not in message and "Traceback" not in await resp.text()


async def test_rate_limit_is_429(trained_world_dir):
    async with serve(trained_world_dir, Limits(max_prompt_bytes=MAX_PROMPT, requests_per_second=2)) as client:
        statuses = [(await client.get("/api/world", headers=auth())).status for _ in range(6)]
    assert 200 in statuses and 429 in statuses  # six calls cannot all fall in seconds allowing two each


async def test_unreachable_model_services_are_503(trained_world_dir):
    """Model services that are not up (yet): the page's API answers 503 and the health check says not ready."""
    from services.backends.triton_backend import TritonBackend
    from services.triton import free_ports

    async with serve(trained_world_dir, backend=TritonBackend(f"127.0.0.1:{free_ports(1)[0]}", timeout_s=2.0)) as client:
        resp = await client.get("/healthz")
        assert resp.status == 503 and (await resp.json())["ready"] is False
        message = await expect_error(await client.get("/api/world", headers=auth()), 503, "UNAVAILABLE")
        assert "model service unavailable" in message
