"""The worlds one process serves, each through its own ModelBackend: one fixed world (`--world DIR`, no catalogue)
or every version in a world catalogue (genie/catalog.py), started on first use and stopped when idle so that the
models held for versions stay within a memory budget.

A session is pinned to one version (its `ref`, "name@version"); a version publishes while sessions play older
ones, which keep their backends. The gateway asks `backend(ref)` at every call, so a version that was evicted
loads again when a session on it steps (its K/V caches are soft state: the frames do not change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genie.catalog import CatalogError, DirectoryCatalog, RetiredWorld, WorldVersion, parse_ref
from genie.spec import WorldSpec
from services.backends.backend import BackendUnavailable, ModelBackend

log = logging.getLogger(__name__)
SINGLE = ""  # the ref of the one world a process serves without a catalogue


class WorldNotFound(Exception):
    """No such world or version to open or step (NOT_FOUND / FAILED_PRECONDITION to a client)."""

    def __init__(self, message: str, retired: bool = False) -> None:
        super().__init__(message)
        self.retired = retired


class ModelsBudgetExceeded(Exception):
    """Loading a version would hold more model memory than the budget and nothing loaded is idle to make room."""


@dataclass
class _Loaded:
    backend: ModelBackend
    bytes: int
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)


def weights_bytes(world_dir: Path) -> int:
    """What a loaded world holds in memory, to first order: its checkpoints' tensors (fp32, as stored)."""
    return sum(p.stat().st_size for p in Path(world_dir).glob("*/model.safetensors"))


class ServedWorlds:
    """Maps world refs to started backends.

    single: the backend of a process that serves one world (ref "" and its spec); or
    catalog + make: a catalogue and a factory `make(version) -> ModelBackend` (not started) for its versions, with
    `default` the world name a session gets when it names none, and `budget_bytes` the model memory (weights of
    loaded versions) this process may hold; 0 = no limit.
    """

    def __init__(self, single: ModelBackend | None = None, catalog: DirectoryCatalog | None = None,
                 make: Callable[[WorldVersion], ModelBackend] | None = None, default: str = "",
                 budget_bytes: int = 0) -> None:
        if (single is None) == (catalog is None):
            raise ValueError("serve either one world (a backend) or a catalogue, not both or neither")
        if catalog is not None and make is None:
            raise ValueError("a catalogue needs a backend factory")
        self.catalog, self._make, self.default, self.budget_bytes = catalog, make, default, budget_bytes
        self._loaded: dict[str, _Loaded] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        if single is not None:
            self._loaded[SINGLE] = _Loaded(single, 0)
        if default:
            parse_ref(default)

    @property
    def single(self) -> ModelBackend | None:
        return self._loaded[SINGLE].backend if self.catalog is None else None

    # --- which version ---------------------------------------------------------------------------------------

    def resolve(self, world: str = "") -> WorldVersion | None:
        """The version a new session on `world` ("", "name" or "name@version") gets: None for the single world.
        Raises WorldNotFound (unknown, or retired: it takes no new sessions) or ValueError (a malformed ref)."""
        if self.catalog is None:
            if world:
                raise WorldNotFound(f"this gateway serves one world and no catalogue: leave world empty, not {world!r}")
            return None
        name, version = parse_ref(world or self.default or self._only_name())
        try:
            return self.catalog.resolve(name, version)
        except CatalogError as exc:
            raise WorldNotFound(str(exc), retired=isinstance(exc, RetiredWorld)) from exc

    def _only_name(self) -> str:
        names = self.catalog.names() if self.catalog is not None else []
        if len(names) != 1:
            raise WorldNotFound(f"name a world: the catalogue holds {len(names)} ({', '.join(names) or 'none yet'}) "
                                f"and no default is set")
        return names[0]

    def versions(self) -> list[WorldVersion]:
        return [] if self.catalog is None else self.catalog.versions()

    def loaded(self) -> dict[str, int]:
        """ref -> model bytes held, for every started version."""
        return {ref: item.bytes for ref, item in self._loaded.items()}

    # --- backends --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, ref: str):
        """The started backend of a pinned ref, held (not evicted) until the block ends."""
        item = await self._get(ref)
        item.in_use += 1
        try:
            yield item.backend
        finally:
            item.in_use -= 1
            item.last_used = time.monotonic()

    async def spec(self, ref: str) -> WorldSpec:
        async with self.use(ref) as backend:
            return backend.spec

    async def _get(self, ref: str) -> _Loaded:
        item = self._loaded.get(ref)
        if item is not None:
            if item.backend.spec is None:  # a single backend that could not start yet (model services down)
                await item.backend.start()
            return item
        if self.catalog is None:
            raise WorldNotFound(f"this gateway serves one world; it has no version {ref!r}")
        task = self._loading.get(ref)
        if task is None:  # concurrent first calls of one version share its load
            task = self._loading[ref] = asyncio.create_task(self._load(ref))
            task.add_done_callback(lambda _: self._loading.pop(ref, None))
        return await asyncio.shield(task)

    async def _load(self, ref: str) -> _Loaded:
        name, version = parse_ref(ref)
        if version is None:
            raise WorldNotFound(f"a session's world must be pinned to a version, got {ref!r}")
        try:
            entry = self.catalog.resolve(name, version, include_retired=True)  # retired: open sessions may finish
            await asyncio.to_thread(self.catalog.verify, entry)
        except CatalogError as exc:
            raise WorldNotFound(str(exc)) from exc
        size = weights_bytes(entry.path)
        async with self._lock:
            await self._make_room(size, ref)
            backend = self._make(entry)
            try:
                await backend.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await backend.close()
                raise
            item = self._loaded[ref] = _Loaded(backend, size)
        log.info("loaded world %s (%s, %.1f MB of weights)", ref, entry.digest[:19], size / 1e6)
        return item

    async def _make_room(self, size: int, ref: str) -> None:
        """Stops least recently used idle versions until `size` more bytes fit the budget."""
        if not self.budget_bytes:
            return
        if size > self.budget_bytes:
            raise ModelsBudgetExceeded(f"world {ref} needs {size / 1e6:.1f} MB of model memory, over the budget of "
                                       f"{self.budget_bytes / 1e6:.1f} MB")
        while sum(i.bytes for i in self._loaded.values()) + size > self.budget_bytes:
            idle = [(i.last_used, r) for r, i in self._loaded.items() if i.in_use == 0 and r != SINGLE]
            if not idle:
                raise ModelsBudgetExceeded(f"world {ref} does not fit the model memory budget "
                                           f"({self.budget_bytes / 1e6:.1f} MB) while every loaded version is busy; "
                                           f"retry shortly")
            await self._evict(min(idle)[1])

    async def _evict(self, ref: str) -> None:
        item = self._loaded.pop(ref)
        log.info("unloaded idle world %s (%.1f MB)", ref, item.bytes / 1e6)
        unload = getattr(item.backend, "unload_models", None)  # models held in a model service (Triton)
        try:
            if unload is not None:
                await unload()
        finally:
            await item.backend.close()

    async def ready(self) -> bool:
        """The single world's backend answers; with a catalogue, the default world resolves and loads."""
        try:
            if self.catalog is None:
                return await (await self._get(SINGLE)).backend.ready()
            entry = self.resolve()
            return await (await self._get(entry.ref)).backend.ready()
        except (WorldNotFound, ModelsBudgetExceeded, BackendUnavailable, ValueError):
            return False

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for ref in list(self._loaded):
            item = self._loaded.pop(ref)
            await item.backend.close()
