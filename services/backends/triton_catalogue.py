"""Catalogue versions on Triton: each published world version is three Triton models ("coinrun.v3.dynamics", ...)
that a Triton with explicit model control (`genie triton serve --explicit`) loads when a gateway first needs them
and unloads when that gateway's models budget wants the room back.

The load request carries the model's whole config (services/<kind>/config.pbtxt with the version's directory, world
spec and cache settings) and its model.py, so Triton needs no repository entry per version: only the catalogue's
directory, mounted at the same path as the gateway's (a ReadWriteMany volume in the chart). Loading is idempotent
(a ready model is not loaded again), so gateways that race to load one version load it once or harmlessly twice.
Another gateway may unload a version this one still plays: the next call finds it missing, loads it again and
retries (TritonBackend), and the session's frames stay the same (the K/V caches are soft state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from google.protobuf import json_format
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from genie.catalog import WorldVersion
from services.triton import protocol as P

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionModels:
    """How one catalogue version's models are named and configured on Triton."""

    entry: WorldVersion
    threads: int = 1  # torch threads of each model instance (a Triton model runs in a process of its own)
    cache_bytes: int = 1 << 30  # soft K/V cache cap of the tokenizer and dynamics instances
    load_timeout_s: float = 120.0  # a load imports torch and reads the checkpoints in a fresh stub process

    def names(self) -> dict[str, str]:
        """kind -> this version's Triton model name."""
        return {kind: P.version_model_name(kind, self.entry.name, self.entry.version) for kind in P.MODELS}

    def request(self, kind: str) -> tuple[str, str, dict[str, bytes]]:
        """(model name, config JSON, files) of a load_model request for one kind."""
        from services.triton.launcher import model_config, model_file

        name = self.names()[kind]
        config = model_config(kind, self.entry.path, threads=self.threads, cache_bytes=self.cache_bytes, name=name)
        config.parameters[P.PARAM_WORLD_DIGEST].string_value = self.entry.digest
        return name, json_format.MessageToJson(config), {"file:1/model.py": model_file(kind)}

    async def ensure_loaded(self, client: triton_aio.InferenceServerClient, kind: str) -> bool:
        """Loads this version's `kind` at one server unless it is ready there with this version's digest (a model of
        that name from another catalogue is replaced); True when this call loaded it."""
        name, config, files = self.request(kind)
        if await _ready(client, name) and await _digest(client, name) == self.entry.digest:
            return False
        log.info("loading %s into Triton", name)
        await client.load_model(name, config=config, files=files, client_timeout=self.load_timeout_s)
        return True

    async def unload(self, client: triton_aio.InferenceServerClient, kind: str) -> None:
        """Unloads this version's `kind` at one server (no error when it is not loaded)."""
        name = self.names()[kind]
        try:
            await client.unload_model(name, client_timeout=30.0)
        except InferenceServerException as exc:  # already gone, or the server is down: nothing held there
            log.info("unloading %s: %s", name, exc.message())


async def _digest(client: triton_aio.InferenceServerClient, name: str) -> str:
    try:
        config = await client.get_model_config(name, as_json=True, client_timeout=10.0)
        return config["config"]["parameters"][P.PARAM_WORLD_DIGEST]["string_value"]
    except (InferenceServerException, KeyError):
        return ""


async def _ready(client: triton_aio.InferenceServerClient, name: str) -> bool:
    try:
        return bool(await client.is_model_ready(name, client_timeout=10.0))
    except InferenceServerException:
        return False

