"""Glue shared by the Triton `1/model.py` files; imported only inside the Python backend stub (needs pb_utils).

Every model's execute() has the same shape: parse each request (a bad one gets its own INVALID_ARG response),
group the good ones by what must be equal to run together, make one `genie` call per group, and split the
result into one response per request. `execute_batched` is that loop; a model supplies parse/run/pack.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from services.triton import protocol as P

log = logging.getLogger(__name__)


def model_setup(args: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """Reads the model config's parameters, applies the torch thread count, and returns (world dir, parameters)."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    threads = int(params.get(P.PARAM_THREADS) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    world_dir = params.get(P.PARAM_WORLD_DIR) or os.environ.get(P.WORLD_DIR_ENV, "")
    if not world_dir or not Path(world_dir).is_dir():
        raise pb_utils.TritonModelException(
            f"{config.get('name')}: no world directory (parameter {P.PARAM_WORLD_DIR!r} or env {P.WORLD_DIR_ENV}): {world_dir!r}"
        )
    return Path(world_dir), params


def check_cache_budget(pool, args: dict[str, str], what: str) -> None:
    """Refuses to load (TritonModelException, in Triton's log) when the K/V cache budget cannot hold one batch of
    the model's max_batch_size: the pool would otherwise grow past its budget."""
    batch = int(json.loads(args["model_config"]).get("max_batch_size") or 1)
    try:
        pool.require(batch, what)
    except ValueError as exc:
        raise pb_utils.TritonModelException(f"{exc} (model parameter {P.PARAM_CACHE_BYTES}; launcher --cache-bytes)") from exc


def instance_device(args: dict[str, str]) -> str:
    """The device of this model instance: its GPU for a KIND_GPU instance group, else the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    return "cpu"


def read_inputs(request, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """One request's input tensors without the batch axis. Raises ValueError unless each holds exactly one item."""
    out = {}
    for name in (*required, *optional):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if name in required:
                raise ValueError(f"missing input {name}")
            continue
        value = tensor.as_numpy()
        if value.ndim == 0 or value.shape[0] != 1:
            raise ValueError(f"input {name}: send one item per request (batch 1), got shape {value.shape}")
        out[name] = value[0]
    return out


def scalar(x: dict[str, np.ndarray], name: str) -> Any:
    """A (1,) input as a Python int / float / str."""
    value = x[name].reshape(-1)
    if value.shape != (1,):
        raise ValueError(f"input {name} must hold one value, got shape {x[name].shape}")
    v = value[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v.item()


def num_frames(x: dict[str, np.ndarray], rows: int, least: int = 1) -> int:
    """The NUM_FRAMES of a request, checked against the `rows` it padded to."""
    t = int(scalar(x, P.NUM_FRAMES))
    if not least <= t <= rows:
        raise ValueError(f"{P.NUM_FRAMES} = {t} must be in [{least}, {rows}] (the rows sent)")
    return t


def check_tokens(tokens: np.ndarray, n: int, k: int) -> None:
    """tokens: (t, N) int32 in [0, K)."""
    if tokens.ndim != 2 or tokens.shape[1] != n:
        raise ValueError(f"{P.WINDOW_TOKENS} must be (W, {n}), got {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
        raise ValueError(f"{P.WINDOW_TOKENS} out of range [0, {k})")


def respond(**outputs: np.ndarray) -> pb_utils.InferenceResponse:
    """A response with each output given its batch axis back: (...) -> (1, ...)."""
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)[None]) for name, value in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error(exc: Exception) -> pb_utils.InferenceResponse:
    """Bad input -> INVALID_ARG with the message; anything else -> INTERNAL (traceback logged, not sent)."""
    if isinstance(exc, ValueError | TypeError):
        err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    else:
        log.error("model call failed", exc_info=exc)
        err = pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def execute_batched(
    requests: Sequence,
    parse: Callable[[Any], tuple[Hashable, Any]],
    run: Callable[[Hashable, list[Any]], Sequence[Any]],
    pack: Callable[[Any], pb_utils.InferenceResponse],
) -> list[pb_utils.InferenceResponse]:
    """One response per request: parse each, run each group of equal keys as one batch, pack each result.

    parse(request) -> (group key, item) raises on a bad request; run(key, items) returns one result per item.
    If a group's batched run raises, its items are run one by one, so a bad item fails only its own request.
    """
    responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
    groups: dict[Hashable, list[tuple[int, Any]]] = {}
    for i, request in enumerate(requests):
        try:
            key, item = parse(request)
        except Exception as exc:
            responses[i] = error(exc)
            continue
        groups.setdefault(key, []).append((i, item))
    for key, members in groups.items():
        try:
            results = run(key, [item for _, item in members])
            for (i, _), result in zip(members, results, strict=True):
                responses[i] = pack(result)
        except Exception:
            for i, item in members:  # isolate the failing item(s)
                try:
                    responses[i] = pack(run(key, [item])[0])
                except Exception as exc:
                    responses[i] = error(exc)
    return responses
