"""The world catalogue: named, versioned, content-addressed worlds in a registry directory that every gateway, model
service and rollout worker of a deployment mounts (a ReadWriteMany volume in the chart).

Layout (nothing in a version directory changes once it is visible):

    REGISTRY/
      NAME/
        VERSION/                 1, 2, 3, ...: a complete world directory (world.json, tokenizer/, lam/, dynamics/,
          manifest.json          actions.json, prompts/) plus its manifest: every file's sha256 and size, and the
          world.json ...         world's digest (the sha256 of those entries)
        retired/VERSION          a version that takes no new sessions (open ones may finish)
      .staging/                  publishes in progress, renamed into NAME/ when complete

`publish` checks a world completely before anyone can see it (it loads, its action names and keys are valid, its
models agree with each other and step a frame), copies it into `.staging/`, checks the copy again, writes the
manifest and renames the copy to the next version: a reader sees a whole version or none, and two publishers never
get the same version (a rename onto a version that exists fails, and the loser takes the next number). An object
store fits the same interface (`WorldCatalog`): immutable version prefixes, a manifest written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from genie.diskfull import disk_full_as_error

MANIFEST = "manifest.json"
STAGING = ".staging"
RETIRED = "retired"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CHUNK = 1 << 20


class CatalogError(ValueError):
    """A publish, lookup or retirement that cannot be done; the message says why. Nothing was changed."""


class RetiredWorld(CatalogError):
    """The version asked for is retired: it takes no new sessions."""


@dataclass(frozen=True)
class WorldVersion:
    """One published world version, as a session pins it: `ref` is "name@version"."""

    name: str
    version: int
    digest: str  # sha256 over the manifest's file entries: equal digests, equal worlds
    path: Path  # the version's directory (a world directory)
    published_at: float = 0.0
    retired: bool = False
    source: str = ""  # where it was published from (a path or a job id), for the record

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["ref"] = self.ref
        return d


class WorldCatalog(Protocol):
    """What the gateway, the model services and the jobs need from a catalogue (a directory today)."""

    def publish(self, world_dir: Path, name: str, source: str = "") -> WorldVersion: ...

    def versions(self, name: str | None = None) -> list[WorldVersion]: ...

    def resolve(self, name: str, version: int | None = None) -> WorldVersion: ...

    def retire(self, name: str, version: int) -> WorldVersion: ...

    def verify(self, entry: WorldVersion) -> None: ...


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise CatalogError(f"a world name is 1-64 of a-z 0-9 . _ - starting with a letter or digit, got {name!r}")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """"coinrun" -> ("coinrun", None); "coinrun@3" -> ("coinrun", 3)."""
    name, sep, version = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise CatalogError(f"a world version is a positive integer, got {ref!r}")
    return name, int(version)


def file_digests(root: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every regular file under `root` except the manifest, sorted.
    Links and other special files are refused: a version must be self-contained."""
    out: dict[str, dict] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CatalogError(f"{rel} in {root} is a link or a special file; a world version holds plain files only")
        if path.is_dir() or rel == MANIFEST:
            continue
        out[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return out


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def world_digest(files: dict[str, dict]) -> str:
    """The digest of a world: sha256 over its sorted "path sha256 bytes" lines."""
    lines = "".join(f"{p} {e['sha256']} {e['bytes']}\n" for p, e in sorted(files.items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def check_world(world_dir: Path) -> dict:
    """Loads a world completely, as a server would, and steps it once; returns its serving description (WorldSpec as
    a dict). Raises CatalogError naming what is wrong."""
    import numpy as np
    import torch

    from genie.spec import world_spec_of
    from genie.train.checkpoint import load_model
    from genie.worlds import load_world

    try:
        spec = world_spec_of(world_dir)  # world.json, action names and key bindings
        world, cfg = load_world(world_dir, cache_bytes=0)
        lam = load_model(Path(world_dir) / "lam", "lam")
        if lam.cfg.vq.num_codes != spec.num_actions:
            raise ValueError(f"the LAM has {lam.cfg.vq.num_codes} latent actions, the dynamics {spec.num_actions}")
        prompt = torch.from_numpy(np.full((1, 1, spec.height, spec.width, spec.channels), 128, np.uint8))
        state, _ = world.reset(prompt, [0])
        world.step(state, [0])
    except CatalogError:
        raise
    except Exception as exc:  # a broken world can fail in any loader (safetensors, json, shapes): say which world
        raise CatalogError(f"{world_dir} is not a complete, loadable world: {exc}") from exc
    return spec.to_dict()


class DirectoryCatalog:
    """The catalogue in a directory (a mounted volume shared by every replica)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # --- publishing ----------------------------------------------------------------------------------------------

    def publish(self, world_dir: Path, name: str, source: str = "") -> WorldVersion:
        """Checks `world_dir`, copies it in as the next version of `name` and returns that version; the source is
        not changed. Raises CatalogError (and publishes nothing) when the world does not load or the copy differs."""
        world_dir = Path(world_dir)
        check_name(name)
        if not (world_dir / "world.json").is_file():
            raise CatalogError(f"{world_dir} is not a world directory (no world.json)")
        check_world(world_dir)  # before the copy: a broken world costs no disk
        staging = self.root / STAGING / uuid.uuid4().hex
        # Any failure (a full disk, a check) removes the staged copy at once; nothing under NAME/ changes.
        with disk_full_as_error(self.root, "world version", cleanup=staging):
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(world_dir, staging, symlinks=True)
            (staging / MANIFEST).unlink(missing_ok=True)  # a world taken from a catalogue gets a new manifest
            files = file_digests(staging)
            if files != file_digests(world_dir):
                raise CatalogError(f"{world_dir} changed while it was copied; publish it again")
            spec = check_world(staging)  # the copy is what is served: check it, not only the source
            manifest = {"name": name, "digest": world_digest(files), "published_at": time.time(),
                        "source": source or str(world_dir.resolve()), "spec": spec, "files": files}
            _write_json(staging / MANIFEST, manifest)
            return self._claim_version(staging, name, manifest)

    def _claim_version(self, staging: Path, name: str, manifest: dict) -> WorldVersion:
        """Renames the staged copy to the next free version; a concurrent publisher's version is never replaced."""
        (self.root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            version = max(self._version_numbers(name), default=0) + 1
            target = self.root / name / str(version)
            try:
                os.rename(staging, target)  # fails when `target` exists and is not empty: it is someone's version
            except OSError:
                if target.exists():
                    continue
                raise
            _fsync_dir(target.parent)
            return self._entry(name, version, {**manifest})
        raise CatalogError(f"could not claim a version of {name}: too many concurrent publishes")

    def retire(self, name: str, version: int) -> WorldVersion:
        """Marks a version as taking no new sessions (sessions on it may finish). Idempotent."""
        entry = self.resolve(name, version, include_retired=True)
        marker = self.root / name / RETIRED / str(version)
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        return WorldVersion(**{**asdict(entry), "retired": True})

    # --- reading -------------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name))

    def versions(self, name: str | None = None) -> list[WorldVersion]:
        """Every visible version (of `name`, or of all worlds), oldest first, retired ones included."""
        names = [check_name(name)] if name is not None else self.names()
        out = []
        for n in names:
            for v in sorted(self._version_numbers(n)):
                entry = self._read(n, v)
                if entry is not None:
                    out.append(entry)
        return out

    def resolve(self, name: str, version: int | None = None, include_retired: bool = False) -> WorldVersion:
        """A version of `name` (default: the newest that is not retired); CatalogError when there is none."""
        check_name(name)
        if version is not None:
            entry = self._read(name, int(version))
            if entry is None:
                raise CatalogError(f"no world {name}@{version} in the catalogue")
            if entry.retired and not include_retired:
                raise RetiredWorld(f"world {name}@{version} is retired: it takes no new sessions")
            return entry
        live = [e for e in self.versions(name) if not e.retired]
        if not live:
            known = "all its versions are retired" if self._version_numbers(name) else "it was never published"
            raise CatalogError(f"no world {name} to open: {known}")
        return live[-1]

    def verify(self, entry: WorldVersion) -> None:
        """Raises CatalogError unless the version's files are exactly those its manifest lists (a server checks this
        before it serves a version, so a damaged copy is reported instead of half-served)."""
        manifest = _read_json(entry.path / MANIFEST)
        files = file_digests(entry.path)
        if manifest is None or files != manifest.get("files") or world_digest(files) != entry.digest:
            raise CatalogError(f"world {entry.ref} at {entry.path} does not match its manifest (damaged or changed)")

    def _version_numbers(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]

    def _read(self, name: str, version: int) -> WorldVersion | None:
        manifest = _read_json(self.root / name / str(version) / MANIFEST)
        return None if manifest is None else self._entry(name, version, manifest)

    def _entry(self, name: str, version: int, manifest: dict) -> WorldVersion:
        return WorldVersion(name=name, version=version, digest=manifest["digest"], path=self.root / name / str(version),
                            published_at=float(manifest.get("published_at", 0.0)),
                            retired=(self.root / name / RETIRED / str(version)).exists(),
                            source=str(manifest.get("source", "")))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "digest" in data else None


def _write_json(path: Path, data: dict) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
