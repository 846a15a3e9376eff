"""`genie agent train`: LAM-BC and the oracle on a few real expert episodes, resume, and the CLI's errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from genie.agent.train import AgentTrainConfig, load_mappings, load_policy, train_agent
from genie.cli import main


def _cfg(expert_data, lam_world, **kw):
    base = dict(data=str(expert_data), world=str(lam_world), steps=6, batch_size=4, labelled=(3, 10, 10_000),
                log_every=2, checkpoint_every=2)
    return AgentTrainConfig(**{**base, **kw})


def test_lam_bc_trains_fits_mappings_and_resumes_exactly(expert_data, lam_world, tmp_path):
    cfg = _cfg(expert_data, lam_world)
    full = train_agent(cfg, tmp_path / "full", progress=False)
    assert full["finished"] and full["num_actions"] == 4 and set(full["mapping_val_accuracy"]) == {"3", "10", "10000"}
    maps = load_mappings(tmp_path / "full")
    assert maps[3].labelled == 3 and maps[10].labelled == 10
    assert maps[10_000].labelled == full["transitions"]  # k past the data uses every labelled transition
    assert all(0 <= a < 15 for m in maps.values() for a in m.table)

    part = train_agent(cfg, tmp_path / "part", progress=False, stop_after=3)
    assert part == {"run": str(tmp_path / "part"), "step": 3, "finished": False}
    train_agent(cfg, tmp_path / "part", progress=False)  # resumes from the step-3 checkpoint
    a, b = load_file(tmp_path / "full/policy/model.safetensors"), load_file(tmp_path / "part/policy/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    labels_a = load_file(tmp_path / "full/labels.safetensors")["latent"]
    assert torch.equal(labels_a, load_file(tmp_path / "part/labels.safetensors")["latent"])
    assert ((labels_a >= 0) & (labels_a < 4)).all()
    assert len((tmp_path / "full/metrics.jsonl").read_text().splitlines()) == 3


def test_oracle_trains_on_the_true_actions(expert_data, lam_world, tmp_path):
    out = train_agent(_cfg(expert_data, lam_world, target="true"), tmp_path, progress=False)
    assert out["num_actions"] == 15 and "mapping_val_accuracy" not in out
    assert load_policy(tmp_path / "policy").cfg.num_actions == 15
    assert (load_file(tmp_path / "labels.safetensors")["latent"] == -1).all()  # the oracle never asks the LAM


def test_an_augmented_impala_policy_resumes_exactly(expert_data, lam_world, tmp_path):
    from genie.agent.policy import PolicyConfig

    cfg = _cfg(expert_data, lam_world, target="true", augment=3, policy=PolicyConfig(arch="impala", width_mult=8))
    train_agent(cfg, tmp_path / "full", progress=False)
    train_agent(cfg, tmp_path / "part", progress=False, stop_after=3)
    train_agent(cfg, tmp_path / "part", progress=False)  # the shifts, like the batches, are replayed
    a, b = load_file(tmp_path / "full/policy/model.safetensors"), load_file(tmp_path / "part/policy/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_policy(tmp_path / "full/policy").cfg.arch == "impala"
    plain = train_agent(_cfg(expert_data, lam_world, target="true", augment=0,
                             policy=PolicyConfig(arch="impala", width_mult=8)), tmp_path / "plain", progress=False)
    assert plain["finished"]
    c = load_file(tmp_path / "plain/policy/model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the augmentation changed what was learnt


def test_a_changed_config_does_not_resume(expert_data, lam_world, tmp_path):
    train_agent(_cfg(expert_data, lam_world), tmp_path, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="different config"):
        train_agent(_cfg(expert_data, lam_world, lr=1e-3), tmp_path, progress=False)


@pytest.mark.parametrize("args", [
    ["agent", "train", "--steps", "0"],
    ["agent", "train", "--labelled", "10,x"],
    ["agent", "train", "--labelled", "0"],
    ["agent", "train", "--stop-after", "0"],
    ["agent", "train", "--context", "0"],
    ["agent", "train", "--world", "/nonexistent"],
    ["agent", "eval", "--levels", "0"],
    ["agent", "eval", "--lam-bc", "/nonexistent"],
    ["agent", "expert", "--episodes", "0"],
])
def test_bad_arguments_exit_2_with_one_line(args, expert_data, tmp_path):
    if args[1] == "train":
        args = [*args, "--data", str(expert_data)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_cli_train_prints_a_summary(expert_data, lam_world, tmp_path):
    result = CliRunner().invoke(main, ["agent", "train", "--data", str(expert_data), "--world", str(lam_world),
                                       "--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--quiet",
                                       "--labelled", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["finished"] is True
