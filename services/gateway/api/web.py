"""The browser play page and its JSON API: a thin aiohttp adapter over SessionService, beside the gRPC API.

Routes (every /api call needs `Authorization: Bearer <token>`; the page and its static files do not):
    GET    /                          the play page (it reads the token from the URL fragment, `/#token=...`)
    GET    /static/{file}             its JS and CSS
    GET    /healthz                   200 when the backend and store answer, else 503; "store" names a refusal (full)
    GET    /api/worlds                {catalogue, default, worlds: [{name, version, ref, digest, retired, published}]}
    GET    /api/world?world=W         {actions: [{id, name}], keys: [{key, action, share}], height, width, window,
                                      prompts}; keys: the four arrow keys, action null when unbound
    GET    /api/prompts/{i}?world=W   the world's i-th prompt image (PNG)
    POST   /api/sessions              JSON {prompt: i, world?, steps?, temperature?, seed?}, or a PNG/JPEG body
                                      (image/*) with optional ?world=&steps=&temperature=&seed= -> {session_id, step,
                                      frame, world}
    GET    /api/sessions/{id}         {session_id, step, version, created, expires, world, world_digest, sampling}

W is "" (the default world), "name" (its newest live version) or "name@version"; a gateway without a catalogue
serves one world and takes only "".
    POST   /api/sessions/{id}/step    JSON {action} -> {session_id, step, action, action_name, frame}
    DELETE /api/sessions/{id}         {session_id, closed: true}

Frames travel as base64 PNG. Errors are JSON {code, message}, `code` being the GatewayError's gRPC status
name, with the matching HTTP status; nothing escapes as a bare 500 traceback.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from genie.spec import WorldSpec
from genie.worlds import load_prompts
from services.gateway.security.auth import bearer
from services.gateway.sessions import GatewayError, Outcome, SessionService, encode_png

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

# GatewayError.code (a gRPC status name) -> HTTP status.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}
# The reverse, for aiohttp's own HTTP errors (unknown route, body too large, ...), so every error has one shape.
_CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
                   409: "ABORTED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                   503: "UNAVAILABLE"}
_BODY_MARGIN = 64 << 10  # above max_prompt_bytes: a prompt just over the limit gets the service's precise 400
# The page loads nothing from elsewhere; prompt thumbnails are blob: URLs, frames data: URLs.
_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

SERVICE = web.AppKey("service", SessionService)
PROMPTS = web.AppKey("prompts", list)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_web_app(service: SessionService, world_dir: Path | None = None) -> web.Application:
    """The play page and JSON API over `service`; `world_dir` supplies the prompt images (none when None).

    The caller starts and stops the service's backend and store; this app only adapts HTTP to it.
    """
    app = web.Application(client_max_size=service.limits.max_prompt_bytes + _BODY_MARGIN,
                          middlewares=[_headers_middleware, _errors_middleware])  # headers wrap error replies too
    app[SERVICE] = service
    app[PROMPTS] = load_prompts(world_dir) if world_dir is not None else []
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/api/world", _world)
    app.router.add_get("/api/worlds", _worlds)
    app.router.add_get("/api/prompts/{index}", _prompt)
    app.router.add_post("/api/sessions", _open)
    app.router.add_get("/api/sessions/{session_id}", _info)
    app.router.add_post("/api/sessions/{session_id}/step", _step)
    app.router.add_delete("/api/sessions/{session_id}", _close)
    return app


# --- middleware ------------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure into JSON {code, message}; unexpected ones are logged with their traceback, not sent."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"request body too large: the limit is {request.app[SERVICE].limits.max_prompt_bytes} bytes"
        return _error(exc.status, _CODE_OF_STATUS.get(exc.status, "INTERNAL"), message)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "INTERNAL", "internal error; see the gateway log")


@web.middleware
async def _headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")  # frames and session info are per-user and live
    return response


# --- page and health -------------------------------------------------------------------------------------


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    ready = await service.ready()
    body: dict[str, object] = {"ready": ready, "store": "ok"}
    refusal = service.store_refusal()
    if refusal is not None:  # e.g. full: still ready (reads and closes work), but say why writes are refused
        body["store"], body["store_message"] = refusal
    return web.json_response(body, status=200 if ready else 503)


# --- API -------------------------------------------------------------------------------------------------


async def _client(request: web.Request) -> str:
    return await request.app[SERVICE].authorize(bearer(request.headers.get("Authorization")))


async def _spec(service: SessionService, world: str = "") -> WorldSpec:
    return await service.world(world)  # starts the backend if it is not up yet (UNAVAILABLE while it cannot)


def _prompts(request: web.Request, world: str) -> list[Path]:
    """The prompt images of `world` (a catalogue's version, as a new session would get it) or the one world's."""
    entry = request.app[SERVICE].resolve_world(world)
    return request.app[PROMPTS] if entry is None else load_prompts(entry.path)


async def _world(request: web.Request) -> web.Response:
    await _client(request)
    world = request.query.get("world", "")
    spec = await _spec(request.app[SERVICE], world)
    actions = [{"id": a, "name": spec.action_name(a)} for a in range(spec.num_actions)]
    keys = [{"key": b.key, "action": b.action, "share": b.share} for b in spec.key_bindings()]
    return web.json_response({"actions": actions, "keys": keys, "height": spec.height, "width": spec.width,
                              "window": spec.window, "prompts": len(_prompts(request, world))})


async def _worlds(request: web.Request) -> web.Response:
    await _client(request)
    service: SessionService = request.app[SERVICE]
    return web.json_response({"catalogue": service.worlds.catalog is not None, "default": service.worlds.default,
                              "worlds": [_world_entry(e) for e in service.list_worlds()]})


def _world_entry(entry) -> dict[str, Any]:
    return {"name": entry.name, "version": entry.version, "ref": entry.ref, "digest": entry.digest,
            "retired": entry.retired, "published": entry.published_at}


async def _prompt(request: web.Request) -> web.Response:
    await _client(request)
    index = _int(request.match_info["index"], "prompt index")
    prompts = _prompts(request, request.query.get("world", ""))
    return web.Response(body=_prompt_bytes(prompts, index, "NOT_FOUND"), content_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})


def _prompt_bytes(prompts: list[Path], index: int, code: str) -> bytes:
    if not 0 <= index < len(prompts):
        raise GatewayError(code, f"no prompt {index}: this world has {len(prompts)} prompt images")
    return prompts[index].read_bytes()


async def _open(request: web.Request) -> web.Response:
    client = await _client(request)
    service = request.app[SERVICE]
    if request.content_type.startswith("image/"):
        image = await request.read()
        options = dict(request.query)
    elif request.content_type == "application/json":
        options = await _json(request)
        if "prompt" not in options:
            raise GatewayError("INVALID_ARGUMENT", "give {\"prompt\": <index>} or post a PNG/JPEG body with Content-Type image/*")
        image = _prompt_bytes(_prompts(request, _str(options.get("world", ""), "world")), _int(options["prompt"], "prompt"),
                              "INVALID_ARGUMENT")
    else:
        raise GatewayError("INVALID_ARGUMENT", f"Content-Type must be application/json or image/*, got {request.content_type!r}")
    outcome = await service.open(
        client, image=image, steps=_int(options.get("steps", 0), "steps"),
        temperature=None if options.get("temperature") is None else _float(options["temperature"], "temperature"),
        seed=None if options.get("seed") is None else _int(options["seed"], "seed"),
        world=_str(options.get("world", ""), "world"))
    reply = _frame_reply(outcome)
    return web.json_response(reply, status=201, headers={"Location": f"/api/sessions/{reply['session_id']}"})


async def _info(request: web.Request) -> web.Response:
    client = await _client(request)
    record = await request.app[SERVICE].get(client, request.match_info["session_id"])
    s = record.sampling
    return web.json_response({"session_id": record.session_id, "step": record.state.step, "version": record.version,
                              "created": record.created, "expires": record.expires, "world": record.world,
                              "world_digest": record.world_digest,
                              "sampling": {"steps": s.steps, "temperature": s.temperature}})


async def _step(request: web.Request) -> web.Response:
    client = await _client(request)
    body = await _json(request)
    if "action" not in body:
        raise GatewayError("INVALID_ARGUMENT", "give {\"action\": <latent action id>}")
    service = request.app[SERVICE]
    outcome = await service.step(client, request.match_info["session_id"], _int(body["action"], "action"))
    return web.json_response(_frame_reply(outcome) | {"action": outcome.action, "action_name": outcome.action_name})


async def _close(request: web.Request) -> web.Response:
    client = await _client(request)
    session_id = request.match_info["session_id"]
    await request.app[SERVICE].close(client, session_id)
    return web.json_response({"session_id": session_id, "closed": True})


# --- parsing helpers -------------------------------------------------------------------------------------


def _frame_reply(outcome: Outcome) -> dict[str, Any]:
    frame = base64.b64encode(encode_png(outcome.frame)).decode("ascii")
    return {"session_id": outcome.record.session_id, "step": outcome.record.state.step, "frame": frame,
            "world": outcome.record.world}


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise GatewayError("INVALID_ARGUMENT", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise GatewayError("INVALID_ARGUMENT", f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _int(value: Any, name: str) -> int:
    # JSON numbers arrive as int, query strings as str; bools and floats like 1.5 are refused, not truncated.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be an integer, got {value!r}") from exc


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) > 128:
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be a string of at most 128 characters, got {value!r:.40}")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be a number, got {value!r}")
    try:
        result = float(value)
    except ValueError as exc:
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be a number, got {value!r}") from exc
    if result != result:  # NaN passes every range check downstream
        raise GatewayError("INVALID_ARGUMENT", f"{name} must be a number, got NaN")
    return result
