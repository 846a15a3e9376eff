"""The remote model backend: the world's models behind NVIDIA Triton (services/{tokenizer,lam,dynamics}), over gRPC.

Same contract as InProcessBackend (services/gateway/backend.py). Each call is one Triton request; Triton's
dynamic batcher batches concurrent calls across sessions. Windows are padded to fixed shapes
(services/triton/protocol.py) so that concurrent requests are equal in shape and can batch.

Errors: input is validated here exactly as InProcessBackend does (ValueError, never sent); UNAVAILABLE is
retried with backoff, then it, a timeout or a missing model becomes BackendUnavailable; Triton's INVALID_ARG
becomes ValueError; anything else BackendError. While Triton is down the gRPC channel keeps reconnecting, at most
`reconnect_s` apart (gRPC's default backoff grows to 2 minutes), and a call's retries span longer than that, so the
first call after Triton is back succeeds: a gateway recovers by itself, without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from genie.sampling import SamplingConfig
from genie.state import WorldState
from services.gateway.backend import BackendError, BackendUnavailable, WorldSpec, check_frames, check_state
from services.triton import protocol as P

log = logging.getLogger(__name__)
T = TypeVar("T")

# grpc status names as tritonclient reports them (str(grpc.StatusCode.X))
_UNAVAILABLE, _DEADLINE, _NOT_FOUND, _INVALID = (
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")


class TritonBackend:
    """Talks to a Triton server holding the `tokenizer`, `lam` and `dynamics` models of one world.

    Args:
        url: the server's gRPC address, "host:port".
        timeout_s: deadline of each attempt of each call.
        retries: extra attempts after an UNAVAILABLE answer, spaced by `backoff_s` doubling each time
            (defaults: 0.35 s in all, so a server that is down fails a call quickly).
        reconnect_s: the longest the channel waits between reconnection attempts while the server is down;
            keep it below the retries' span.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.05,
                 reconnect_s: float = 0.25, model_urls: dict[str, str] | None = None) -> None:
        unknown = set(model_urls or {}) - set(P.MODELS)
        if unknown:
            raise ValueError(f"unknown Triton models {sorted(unknown)}; expected some of {list(P.MODELS)}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        # One server for all three models, or one per model (a Deployment each, as the Helm chart runs them).
        self.urls = {m: (model_urls or {}).get(m, url) for m in P.MODELS}
        self.reconnect_s = reconnect_s
        self.spec: WorldSpec | None = None
        self.lam_frames = 0  # the longest clip the LAM takes, published in its config
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}  # by URL

    def _connect(self, model: str) -> triton_aio.InferenceServerClient:
        url = self.urls[model]
        if url not in self._clients:
            ms = int(self.reconnect_s * 1000)
            self._clients[url] = triton_aio.InferenceServerClient(url, channel_args=[
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", min(ms, 50)),
                ("grpc.max_reconnect_backoff_ms", ms),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ])
        return self._clients[url]

    async def start(self) -> None:
        """Reads the WorldSpec the dynamics model publishes and checks every model is ready (else BackendUnavailable)."""
        if self.spec is not None:
            return
        dyn = await self._call(P.DYNAMICS, "get config", lambda c: c.get_model_config(P.DYNAMICS, as_json=True,
                                                                                     client_timeout=self.timeout_s))
        lam = await self._call(P.LAM, "get config", lambda c: c.get_model_config(P.LAM, as_json=True,
                                                                               client_timeout=self.timeout_s))
        try:
            spec = WorldSpec.from_dict(json.loads(_param(dyn, P.PARAM_WORLD_SPEC)))
            self.lam_frames = int(_param(lam, P.PARAM_MAX_FRAMES))
        except (KeyError, ValueError, TypeError) as exc:
            raise BackendError(f"Triton at {self.urls[P.DYNAMICS]}: the models do not publish a usable world spec: {exc}") from exc
        for model in P.MODELS:
            await self._call(model, "check ready", lambda c, m=model: self._require_ready(c, m))
        self.spec = spec

    async def _require_ready(self, client: triton_aio.InferenceServerClient, model: str) -> None:
        if not await client.is_model_ready(model, client_timeout=self.timeout_s):
            raise InferenceServerException(f"model {model} is not ready", status=_UNAVAILABLE)

    def _check_started(self) -> WorldSpec:
        if self.spec is None:
            raise RuntimeError("TritonBackend.start() was not awaited")
        return self.spec

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 1, spec.window)
        inputs = [_tensor(P.FRAMES, _pad(frames, spec.window)), _tensor(P.NUM_FRAMES, np.int32(frames.shape[0]))]
        return await self._infer(P.TOKENIZER, inputs, P.TOKENS)  # (t, N)

    async def next_tokens(self, state: WorldState, action: int, sampling: SamplingConfig) -> np.ndarray:
        spec = self._check_started()
        if not 0 <= int(action) < spec.num_actions:
            raise ValueError(f"action {action} is out of range [0, {spec.num_actions})")
        check_state(state, spec)
        return await self._infer(P.DYNAMICS, _step_inputs(state, action, sampling, spec.window), P.NEXT_TOKENS)  # (N,)

    async def decode_last(self, state: WorldState) -> np.ndarray:
        spec = self._check_started()
        check_state(state, spec)
        return await self._infer(P.TOKENIZER, _window(state, spec.window), P.FRAME)  # (H, W, C)

    async def infer_actions(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 2, self.lam_frames)
        inputs = [_tensor(P.FRAMES, _pad(frames, self.lam_frames)), _tensor(P.NUM_FRAMES, np.int32(frames.shape[0]))]
        return await self._infer(P.LAM, inputs, P.LATENT_ACTIONS)  # (t - 1,)

    async def ready(self) -> bool:
        try:
            for model in P.MODELS:
                if not await self._connect(model).is_model_ready(model, client_timeout=self.timeout_s):
                    return False
            return True
        except (InferenceServerException, OSError):
            return False

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def statistics(self, model: str) -> dict:
        """Triton's inference statistics of one model (counts, batch sizes, timings) as JSON."""
        return await self._call(model, "statistics", lambda c: c.get_inference_statistics(model, as_json=True,
                                                                                          client_timeout=self.timeout_s))

    async def _infer(self, model: str, inputs: list[InferInput], output: str) -> np.ndarray:
        result: InferResult = await self._call(model, "infer", lambda c: c.infer(
            model, inputs, outputs=[InferRequestedOutput(output)], client_timeout=self.timeout_s))
        value = result.as_numpy(output)
        if value is None or value.shape[:1] != (1,):
            raise BackendError(f"Triton model {model!r} at {self.urls[model]} returned no {output} for one item")
        return value[0].copy()  # drop the batch axis; a writable array, as the in-process backend returns

    async def _call(self, model: str, what: str, fn: Callable[[triton_aio.InferenceServerClient], Awaitable[T]]) -> T:
        """Runs fn(client) with retries on UNAVAILABLE; maps Triton's errors to the backend's exceptions."""
        where = f"Triton model {model!r} at {self.urls[model]}"
        for attempt in range(self.retries + 1):
            try:
                return await fn(self._connect(model))
            except InferenceServerException as exc:
                status, message = exc.status(), exc.message()
                if status == _UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(self.backoff_s * 2**attempt)
                    continue
                if status == _UNAVAILABLE:
                    raise BackendUnavailable(f"{where} is unavailable ({what}, {attempt + 1} attempts): {message}") from exc
                if status == _DEADLINE:
                    raise BackendUnavailable(f"{where} did not answer in {self.timeout_s:g} s ({what})") from exc
                if status == _NOT_FOUND:
                    raise BackendUnavailable(f"{where} is not loaded ({what}): {message}") from exc
                if status == _INVALID:
                    raise ValueError(f"{where} rejected the request: {message}") from exc
                raise BackendError(f"{where} failed ({what}, {status}): {message}") from exc
        raise AssertionError("unreachable")


def _param(config: dict, key: str) -> str:
    """A string parameter of a model config fetched as JSON (get_model_config(as_json=True))."""
    return config["config"]["parameters"][key]["string_value"]


def _tensor(name: str, value: np.ndarray | np.generic) -> InferInput:
    """One request item: the value with a batch axis of 1 (scalars become (1, 1))."""
    array = np.asarray(value)
    array = array.reshape(1, *(array.shape or (1,)))
    dtype = "BYTES" if array.dtype == object else _DTYPES[array.dtype]
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


_DTYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


def _pad(x: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    """(t, ...) -> (rows, ...), the first t rows being x: fixed shapes let Triton batch different lengths."""
    out = np.full((rows, *x.shape[1:]), fill, dtype=x.dtype)
    out[: x.shape[0]] = x
    return out


def _window(state: WorldState, window: int) -> list[InferInput]:
    """The inputs naming a session's token window: WINDOW_TOKENS (W, N) padded, NUM_FRAMES, SESSION_ID."""
    tokens = state.tokens.numpy().astype(np.int32)
    return [
        _tensor(P.WINDOW_TOKENS, _pad(tokens, window)),
        _tensor(P.NUM_FRAMES, np.int32(tokens.shape[0])),
        _tensor(P.SESSION_ID, np.array(state.session_id.encode(), dtype=object)),
    ]


def _step_inputs(state: WorldState, action: int, sampling: SamplingConfig, window: int) -> list[InferInput]:
    """A dynamics request (not validated: next_tokens checks first)."""
    return [
        *_window(state, window),
        _tensor(P.WINDOW_ACTIONS, _pad(state.actions.numpy().astype(np.int32), window, fill=-1)),
        _tensor(P.SEED, np.int64(state.seed)),
        _tensor(P.STEP, np.int64(state.step)),
        _tensor(P.VERSION, np.int64(state.version)),
        _tensor(P.ACTION, np.int32(action)),
        _tensor(P.SAMPLING_STEPS, np.int32(sampling.steps)),
        _tensor(P.TEMPERATURE, np.float64(sampling.temperature)),
        _tensor(P.SCHEDULE, np.array(sampling.schedule.encode(), dtype=object)),
        _tensor(P.CHOICE_TEMPERATURE, np.float64(sampling.choice_temperature)),
    ]
