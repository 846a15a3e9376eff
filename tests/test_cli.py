"""The `genie` command end to end: train the three models in parts, export a world, roll it out, play it."""

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from genie.config import to_dict
from genie.media import CAPTION_HEIGHT
from genie.presets import tiny
from services.cli import main

TINY = ["--preset", "tiny", "--quiet"]


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_train_export_rollout(tmp_path):
    root = str(tmp_path / "run")
    for kind in ("tokenizer", "lam", "dynamics"):
        code, out = _run(["train", kind, *TINY, "--run-root", root, "--set", f"train_{kind}.steps=20"])
        assert code == 0, out
        assert json.loads(out.strip().splitlines()[-1])["step"] == 20
    code, out = _run(["export", "--run-root", root, "--out", str(tmp_path / "world")])
    assert code == 0, out
    gif = tmp_path / "rollout.gif"
    code, out = _run(["rollout", "--world", str(tmp_path / "world"), "--steps", "5", "--actions", "0,1,2,3,1", "--out", str(gif)])
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["frames"] == 5 and report["actions"] == [0, 1, 2, 3, 1] and report["fps"] > 0
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (64, 64 + CAPTION_HEIGHT)  # a caption strip under each frame
        im.seek(1)
        default_strip = np.array(im.convert("RGB"))[64:]
    code, out = _run(["world", "names", str(tmp_path / "world"), "--set", "0=jump right", "--set", "1=duck"])
    assert code == 0, out
    code, out = _run(["rollout", "--world", str(tmp_path / "world"), "--steps", "5", "--actions", "0,1,2,3,1", "--out", str(gif)])
    assert code == 0, out
    with Image.open(gif) as im:
        im.seek(1)  # the frame action 0 led to: its caption now names it
        assert not np.array_equal(np.array(im.convert("RGB"))[64:], default_strip)
    code, out = _run(["world", "names", str(tmp_path / "world"), "--key", "up=2"])
    assert code == 0, out
    code, out = _run(["rollout", "--world", str(tmp_path / "world"), "--steps", "4", "--actions", "Up,jump,3,duck",
                      "--out", str(gif)])
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["actions"] == [2, 2, 3, 1]  # the up key's latent; "duck" is 1
    assert len(list((tmp_path / "world" / "prompts").glob("*.png"))) == 8
    own = tmp_path / "mine.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(own)
    code, out = _run(["rollout", "--world", str(tmp_path / "world"), "--steps", "2", "--prompt", str(own), "--out", str(gif)])
    assert code == 0, out
    for bad in (["--prompt", "99"], ["--prompt", str(tmp_path / "none.png")], ["--actions", "1,x"], ["--actions", "7"],
                ["--actions", "up,left"]):
        code, out = _run(["rollout", "--world", str(tmp_path / "world"), "--steps", "1", *bad, "--out", str(gif)])
        assert code == 2 and out.count("error: ") == 1, (bad, out)
    assert "left key is unbound" in out and "bound keys: up=2, jump=2" in out and "'duck'" in out


def test_training_resumes_in_parts(tmp_path):
    root = str(tmp_path / "run")
    code, out = _run(["train", "lam", *TINY, "--run-root", root, "--set", "train_lam.steps=8", "--stop-after", "4",
                      "--no-tensorboard"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 4
    assert not (tmp_path / "run" / "lam" / "tb").exists()
    code, out = _run(["train", "lam", *TINY, "--run-root", root, "--set", "train_lam.steps=8"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["resumed_from"] == 4
    assert (tmp_path / "run" / "lam" / "tb").is_dir()  # TensorBoard is on by default


def test_bad_input_exits_2_with_one_line(tmp_path):
    cases = [
        ["train", "tokenizer", *TINY, "--run-root", str(tmp_path), "--set", "tokenizer.patch=5"],
        ["train", "dynamics", *TINY, "--run-root", str(tmp_path / "empty")],
        ["play", "--world", str(tmp_path / "nowhere")],
        ["rollout", "--world", str(tmp_path / "nowhere")],
        ["serve", "--world", str(tmp_path / "nowhere"), "--tokens", "nocolon"],
        ["config", "--preset", "nope"],
        ["export", "--run-root", str(tmp_path / "empty"), "--out", str(tmp_path / "w")],
        ["data", "generate", "--out", str(tmp_path / "d"), "--hold", "5"],
        ["data", "generate", "--out", str(tmp_path / "d"), "--hold", "6-2"],
        ["eval", "--world", str(tmp_path / "nowhere"), "--control-levels", "-1"],
    ]
    for args in cases:
        code, out = _run(args)
        assert code == 2, (args, out)
        lines = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, out


def test_config_prints_json():
    code, out = _run(["config", "--preset", "tiny", "--set", "sampling.steps=3"])
    assert code == 0 and json.loads(out)["sampling"]["steps"] == 3


def test_play_serves_the_page_and_the_grpc_api_until_interrupted(trained_world_dir):
    """`genie play` as users run it: a real process, its page over HTTP, its gRPC API, then Ctrl-C."""
    import asyncio
    import signal
    import subprocess
    import sys
    import urllib.request

    from services.gateway.api.client import GatewayClient

    args = [sys.executable, "-m", "services.cli", "play", "--world", str(trained_world_dir), "--no-browser",
            "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1", "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        page = urllib.request.urlopen(info["page"], timeout=10).read().decode()
        assert "<html" in page.lower()
        assert info["page"].endswith(f"#token={info['token']}")

        async def list_actions():
            async with GatewayClient(info["grpc"], info["token"]) as client:
                return await client.list_actions()

        assert len(asyncio.run(list_actions()).actions) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
    assert code == 0, proc.stderr.read()


def test_world_names_view_edit_rederive_and_errors(tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    (world / "world.json").write_text(json.dumps(to_dict(tiny())))
    a = tiny().dynamics.num_actions
    unbound = {"left": None, "right": None, "up": None, "down": None}
    code, out = _run(["world", "names", str(world)])
    assert code == 0 and json.loads(out) == {"world": str(world), "names": [f"action {i}" for i in range(a)],
                                             "source": "default", "keys": unbound, "keys_source": "default"}
    code, out = _run(["world", "names", str(world), "--set", '1=jump right', "--set", "0=left"])
    assert code == 0, out
    shown = json.loads(out)
    assert shown["names"][:2] == ["left", "jump right"] and shown["source"] == "user"
    assert json.loads((world / "actions.json").read_text())["names"] == shown["names"]
    for bad in (["--set", f"{a}=far"], ["--set", "0=jump right"], ["--set", "nonsense"], ["--set", "0="],
                ["--from-report", str(tmp_path / "none.json")], ["--key", f"up={a}"], ["--key", "fire=1"],
                ["--key", "up=x"], ["--key", "up"], ["--key", "up=1", "--from-report", str(tmp_path / "none.json")]):
        code, out = _run(["world", "names", str(world), *bad])
        assert code == 2 and out.count("error: ") == 1, (bad, out)
    assert json.loads((world / "actions.json").read_text())["names"] == shown["names"]  # bad edits change nothing
    report = {"lam": {"mapping": {"latents": [{"latent": 0, "count": 40, "majority_name": "RIGHT", "purity": 0.5,
                                               "lift": 3.0}]}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    code, out = _run(["world", "names", str(world), "--from-report", str(tmp_path / "report.json")])
    assert code == 0, out
    assert json.loads(out)["names"][:2] == ["RIGHT (50%)", "action 1"] and json.loads(out)["source"] == "mapping"
    hand_written = [f"move {i}" for i in range(a)]
    (world / "actions.json").write_text(json.dumps({"names": hand_written}))  # no "source": written by hand
    code, out = _run(["world", "names", str(world)])
    assert code == 0 and json.loads(out) == {"world": str(world), "names": hand_written, "source": "user",
                                             "keys": unbound, "keys_source": "default"}
    code, out = _run(["world", "names", str(world), "--key", "JUMP=2", "--key", "left=0"])
    assert code == 0, out
    shown = json.loads(out)
    assert shown["keys"] == {**unbound, "up": 2, "left": 0} and shown["keys_source"] == "user"
    assert shown["names"] == hand_written  # binding keys leaves the names alone
    code, out = _run(["world", "names", str(world), "--key", "left=none"])
    assert code == 0 and json.loads(out)["keys"] == {**unbound, "up": 2}


def test_library_imports_no_service():
    """genie/ never imports services/: statically (no import statement names it) and at run time (python -m genie.cli)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "genie"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("services", "genie_api")]
    assert not offenders, offenders
    code = "import sys, genie.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'services'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
    help_text = subprocess.run([sys.executable, "-m", "genie.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in help_text and "world" in help_text and "serve" not in help_text


def _import_graph() -> dict[str, set[str]]:
    """Every module of genie/ and services/ -> the modules of those trees it imports (at the top or in a function)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    modules = {}
    for tree in ("genie", "services"):
        for path in (repo / tree).rglob("*.py"):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:  # the module `name` is, or is defined in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = owner(name)
                if target and target != module and not module.startswith(target + "."):  # a package's own __init__
                    graph[module].add(target)
    return graph


def test_no_import_circles_and_nothing_imports_the_command_layer():
    """genie/ and services/ form no import circle (lazy imports inside functions count), and only command modules
    (cli.py, *_cli.py, cli_common.py) import command modules: the library and the services never reach up to them."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles

    def command(m: str) -> bool:
        leaf = m.rpartition(".")[2]
        return leaf in ("cli", "cli_common") or leaf.endswith("_cli")

    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if command(t) and not command(m))
    assert not upward, upward


def test_the_product_imports_no_harness():
    """harness/ (servers started for tests and benchmarks) is used by tests/ and benchmarks/, never by genie/ or
    services/."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for tree in ("genie", "services"):
        for path in (repo / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                offenders += [f"{path.relative_to(repo)}: {n}" for n in names if n.split(".")[0] == "harness"]
    assert not offenders, offenders
