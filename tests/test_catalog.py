"""The world catalogue (genie/catalog.py) and `genie world publish/list/retire`, on the tiny trained world."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from genie.catalog import MANIFEST, CatalogError, DirectoryCatalog, file_digests, parse_ref, world_digest
from genie.cli import main


def _copy(world: Path, to: Path) -> Path:
    shutil.copytree(world, to)
    return to


def test_publish_numbers_versions_and_records_every_files_digest(trained_world_dir, tmp_path):
    catalog = DirectoryCatalog(tmp_path / "registry")
    v1 = catalog.publish(trained_world_dir, "tiny")
    v2 = catalog.publish(trained_world_dir, "tiny")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.digest == v2.digest == world_digest(file_digests(trained_world_dir))  # content-addressed: same world
    manifest = json.loads((v1.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.relative_to(trained_world_dir).as_posix()
                                      for p in trained_world_dir.rglob("*") if p.is_file()}
    assert manifest["spec"]["num_actions"] > 0
    assert [e.ref for e in catalog.versions()] == ["tiny@1", "tiny@2"]
    assert catalog.resolve("tiny").version == 2  # the newest by default
    assert catalog.resolve("tiny", 1).digest == v1.digest
    catalog.verify(v1)


def test_a_changed_world_gets_another_digest_and_an_old_version_stays_as_it_was(trained_world_dir, tmp_path):
    catalog = DirectoryCatalog(tmp_path / "registry")
    v1 = catalog.publish(trained_world_dir, "tiny")
    before = file_digests(v1.path)
    edited = _copy(trained_world_dir, tmp_path / "edited")
    names = json.loads((edited / "actions.json").read_text()) if (edited / "actions.json").exists() else None
    (edited / "prompts" / "00.png").write_bytes((edited / "prompts" / "01.png").read_bytes())
    v2 = catalog.publish(edited, "tiny")
    assert v2.digest != v1.digest
    assert file_digests(v1.path) == before
    assert names is None or json.loads((v2.path / "actions.json").read_text()) == names


@pytest.mark.parametrize("damage", ["missing dynamics weights", "truncated weights", "bad actions.json", "no world.json"])
def test_a_broken_or_half_copied_world_is_refused_and_nothing_becomes_visible(trained_world_dir, tmp_path, damage):
    world = _copy(trained_world_dir, tmp_path / "broken")
    weights = world / "dynamics" / "model.safetensors"
    if damage == "missing dynamics weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bad actions.json":
        (world / "actions.json").write_text('{"names": ["only one"], "source": "user"}')
    else:
        (world / "world.json").unlink()
    catalog = DirectoryCatalog(tmp_path / "registry")
    with pytest.raises(CatalogError):
        catalog.publish(world, "tiny")
    assert catalog.versions() == []
    assert not list((tmp_path / "registry").rglob("model.safetensors"))  # no staged copy left behind


def test_a_damaged_version_fails_verification(trained_world_dir, tmp_path):
    catalog = DirectoryCatalog(tmp_path / "registry")
    entry = catalog.publish(trained_world_dir, "tiny")
    (entry.path / "tokenizer" / "config.json").write_text("{}")
    with pytest.raises(CatalogError, match="does not match its manifest"):
        catalog.verify(entry)


def test_retired_versions_take_no_new_sessions_but_stay_resolvable_by_pin(trained_world_dir, tmp_path):
    catalog = DirectoryCatalog(tmp_path / "registry")
    catalog.publish(trained_world_dir, "tiny")
    catalog.publish(trained_world_dir, "tiny")
    catalog.retire("tiny", 2)
    assert catalog.resolve("tiny").version == 1  # the newest live one
    with pytest.raises(CatalogError, match="retired"):
        catalog.resolve("tiny", 2)
    assert catalog.resolve("tiny", 2, include_retired=True).retired  # an open session pinned to it still loads it
    catalog.retire("tiny", 1)
    with pytest.raises(CatalogError, match="all its versions are retired"):
        catalog.resolve("tiny")
    with pytest.raises(CatalogError, match="never published"):
        catalog.resolve("other")


def test_concurrent_publishes_never_share_or_overwrite_a_version(trained_world_dir, tmp_path):
    catalog = DirectoryCatalog(tmp_path / "registry")
    results, errors = [], []

    def publish() -> None:
        try:
            results.append(catalog.publish(trained_world_dir, "tiny").version)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4]
    for entry in catalog.versions("tiny"):
        catalog.verify(entry)


@pytest.mark.parametrize("ref", ["", "Upper", "-x", "a/b", "x@0", "x@v2", "x" * 65])
def test_bad_names_and_refs_are_refused(ref):
    with pytest.raises(CatalogError):
        parse_ref(ref)


def test_publish_refuses_a_full_disk_without_leaving_a_partial_version(trained_world_dir, small_disk):
    disk = small_disk("4m")
    disk.fill(leave=64 << 10)
    catalog = DirectoryCatalog(disk.path / "registry")
    with pytest.raises(Exception, match="no space left"):
        catalog.publish(trained_world_dir, "tiny")
    assert catalog.versions() == [] and disk.leftovers() == []
    assert not list((disk.path / "registry").rglob("*.safetensors"))
    disk.free()
    assert catalog.publish(trained_world_dir, "tiny").version == 1


def test_cli_publish_list_retire(trained_world_dir, tmp_path):
    runner = CliRunner()
    registry = str(tmp_path / "registry")
    done = runner.invoke(main, ["world", "publish", str(trained_world_dir), "--name", "tiny", "--registry", registry])
    assert done.exit_code == 0, done.output
    published = json.loads(done.output)
    assert (published["name"], published["version"]) == ("tiny", 1)
    listed = runner.invoke(main, ["world", "list", "--registry", registry])
    assert [json.loads(line)["digest"] for line in listed.output.splitlines()] == [published["digest"]]
    assert json.loads(runner.invoke(main, ["world", "retire", "tiny@1", "--registry", registry]).output)["retired"]
    bad = runner.invoke(main, ["world", "publish", str(tmp_path / "nowhere"), "--name", "tiny", "--registry", registry])
    assert bad.exit_code == 2 and "not a world directory" in bad.output
    bad = runner.invoke(main, ["world", "retire", "tiny", "--registry", registry])
    assert bad.exit_code == 2 and "NAME@VERSION" in bad.output
