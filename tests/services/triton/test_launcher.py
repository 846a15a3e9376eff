"""The launcher's config.pbtxt output: CPU defaults as the source files say, KIND_GPU groups, precision, batching."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.triton import launcher
from services.triton import protocol as P
from services.triton.cli import triton
from services.triton.launcher import (
    GPU_BATCHING,
    SERVICES_DIR,
    Batching,
    Placement,
    TritonServer,
    assemble_repository,
    resolve_placement,
)

KIND_CPU, KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_CPU, model_config_pb2.ModelInstanceGroup.KIND_GPU


def _config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _without_parameters(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    copy = model_config_pb2.ModelConfig()
    copy.CopyFrom(config)
    copy.ClearField("parameters")
    return copy


def test_cpu_default_output_is_the_source_pbtxt_plus_parameters(trained_world_dir, tmp_path):
    repo = assemble_repository(trained_world_dir, tmp_path / "repo", threads=1)
    assert repo.device == "cpu" and "--allow-gpu-metrics=false" in TritonServer(repo).command()
    for name in P.MODELS:
        written, source = _config(repo.models / name / "config.pbtxt"), _config(SERVICES_DIR / name / "config.pbtxt")
        assert _without_parameters(written) == _without_parameters(source)  # groups and batching untouched
        assert [(g.kind, g.count, list(g.gpus)) for g in written.instance_group] == [(KIND_CPU, 1, [])]
        assert (written.max_batch_size, written.dynamic_batching.max_queue_delay_microseconds) == (32, 1000)
        assert written.parameters[P.PARAM_PRECISION].string_value == "auto"


def test_gpu_placement_writes_kind_gpu_groups_precision_and_gpu_batching(trained_world_dir, tmp_path):
    placement = Placement("gpu", instances=2, gpus=(0, 3), precision="bf16")
    repo = assemble_repository(trained_world_dir, tmp_path / "repo", placement=placement,
                               batching={P.DYNAMICS: Batching(512, 4000, (128, 256))})
    assert repo.device == "gpu" and "--allow-gpu-metrics=true" in TritonServer(repo).command()
    for name in P.MODELS:
        config = _config(repo.models / name / "config.pbtxt")
        assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [(KIND_GPU, 2, [0, 3])]
        assert config.parameters[P.PARAM_PRECISION].string_value == "bf16"
        want = Batching(512, 4000, (128, 256)) if name == P.DYNAMICS else GPU_BATCHING[name]
        got = Batching(config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds,
                       tuple(config.dynamic_batching.preferred_batch_size))
        assert got == want
    assert GPU_BATCHING[P.DYNAMICS].max_batch_size > 32  # a GPU batches more than the CPU default
    # No ids: the group names none, and Triton puts `count` instances on every GPU it sees.
    repo = assemble_repository(trained_world_dir, tmp_path / "all", placement=Placement("gpu"), models=[P.DYNAMICS])
    assert [(g.kind, g.count, list(g.gpus)) for g in _config(repo.models / P.DYNAMICS / "config.pbtxt").instance_group] \
        == [(KIND_GPU, 1, [])]


def test_batching_overrides_on_cpu(trained_world_dir, tmp_path):
    repo = assemble_repository(trained_world_dir, tmp_path / "repo", batching={P.TOKENIZER: Batching(8, 0)},
                               queue_delay_us=250, instances=3)
    tok, dyn = (_config(repo.models / m / "config.pbtxt") for m in (P.TOKENIZER, P.DYNAMICS))
    assert (tok.max_batch_size, tok.dynamic_batching.max_queue_delay_microseconds) == (8, 250)
    assert (dyn.max_batch_size, dyn.dynamic_batching.max_queue_delay_microseconds) == (32, 250)
    assert [(g.kind, g.count) for g in dyn.instance_group] == [(KIND_CPU, 3)]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Batching(0, 10), "max batch size must be >= 1"),
    (lambda: Batching(8, -1), "queue delay must be >= 0"),
    (lambda: Batching(8, 10, (16,)), "preferred batch sizes"),
    (lambda: Placement("cpu", gpus=(0,)), "device is cpu"),
    (lambda: Placement("gpu", instances=0), "instances must be >= 1"),
    (lambda: Placement("gpu", gpus=(1, 1)), "distinct"),
    (lambda: Placement("gpu", precision="fp8"), "precision must be one of"),
    (lambda: resolve_placement("gpu", visible=[]), "no GPU is visible"),
    (lambda: resolve_placement("cuda", gpus=[2], visible=[0, 1]), r"GPU ids \[2\] are not visible"),
    (lambda: resolve_placement("tpu", visible=[]), "device must be one of"),
    (lambda: resolve_placement("gpu", precision="int8", visible=[0]), "int8 runs on a CPU only"),
])
def test_bad_placement_and_batching_are_one_line_value_errors(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_resolve_placement_auto_and_aliases():
    assert resolve_placement("auto", visible=[]).device == "cpu"
    assert resolve_placement("auto", visible=[0]).device == "gpu"
    assert resolve_placement("cuda", gpus=[1], visible=[0, 1]) == Placement("gpu", 1, (1,), "auto")


def _serve(world, tmp_path, *args):
    return CliRunner().invoke(triton, ["serve", "--world", str(world), "--repository", str(tmp_path / "repo"), "--dry-run",
                                       *args])


def test_cli_gpu_dry_run_writes_the_asked_config(trained_world_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [0, 1])
    result = _serve(trained_world_dir, tmp_path, "--device", "gpu", "--instances-per-gpu", "2", "--gpus", "1",
                    "--precision", "fp32", "--max-batch", "dynamics=128", "--queue-delay-us", "500")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["device"] == "gpu" and "--allow-gpu-metrics=true" in info["command"]
    dyn, tok = (_config(tmp_path / "repo" / "models" / m / "config.pbtxt") for m in (P.DYNAMICS, P.TOKENIZER))
    assert [(g.kind, g.count, list(g.gpus)) for g in dyn.instance_group] == [(KIND_GPU, 2, [1])]
    assert (dyn.max_batch_size, dyn.dynamic_batching.max_queue_delay_microseconds) == (128, 500)
    want = (GPU_BATCHING[P.TOKENIZER].max_batch_size, 500)
    assert (tok.max_batch_size, tok.dynamic_batching.max_queue_delay_microseconds) == want
    assert dyn.parameters[P.PARAM_PRECISION].string_value == "fp32"


def test_cli_auto_without_a_gpu_is_the_cpu_default(trained_world_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [])
    result = _serve(trained_world_dir, tmp_path, "--device", "auto", "--models", "dynamics")
    assert result.exit_code == 0, result.output
    written = _config(tmp_path / "repo" / "models" / P.DYNAMICS / "config.pbtxt")
    assert _without_parameters(written) == _without_parameters(_config(SERVICES_DIR / P.DYNAMICS / "config.pbtxt"))


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "gpu"], "no GPU is visible"),
    (["--gpus", "0"], "device is cpu"),
    (["--gpus", "zero"], "--gpus must be comma-separated integers"),
    (["--max-batch", "decoder=4"], "--max-batch: unknown model 'decoder'"),
    (["--max-batch", "big"], "--max-batch must be N or model=N"),
    (["--queue-delay-us", "-5"], "queue delay must be >= 0"),
    (["--max-batch", "0"], "max batch size must be >= 1"),
])
def test_cli_bad_values_exit_2_with_one_error_line_before_any_server(trained_world_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [])
    monkeypatch.setattr(TritonServer, "start", lambda self: pytest.fail("must not start a server"))
    result = CliRunner().invoke(triton, ["serve", "--world", str(trained_world_dir), "--repository", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
