"""The play page with a key held: the frames/s a player sees in headless Chromium against a local gateway (web app,
in-process backend, memory store), beside the engine's own B=1 rate measured in the same run.

The page steps again as soon as each frame arrives while a key is held (services/gateway/api/static/play.js), so its
rate is the engine's minus the per-step cost of HTTP, JSON, PNG and the browser. Needs Debian's chromium and
chromium-driver (scripts/system-deps.sh) and the selenium package.

    python benchmarks/bench_page.py --world worlds/demo --seconds 10
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import base_parser, emit, setup_run

from genie.device import single_process_precision
from genie.spec import world_spec_of
from genie.worlds import load_key_bindings, load_prompts, load_world
from harness.page_server import PageServer

TOKEN = "bench-page-token-0123456789"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def engine_rate(world_dir: Path, action: int, steps: int, precision: str = "auto") -> float:
    """Median frames/s of `World.step` at B=1 from the world's first prompt, holding `action`.

    Run it in its own process (`engine_rate_apart`): torch's OpenMP team belongs to the thread that ran it, and a
    second team left over from this call halves the page server's model thread (libgomp; measured on the AVX-512
    kind: 61 vs 34 ms a dynamics call, page 11.7 vs 19 frames/s), a fault of the benchmark, not of a gateway."""
    from PIL import Image

    world, _ = load_world(world_dir, precision=precision)
    prompt = torch.from_numpy(np.array(Image.open(load_prompts(world_dir)[0]).convert("RGB")))[None, None]
    states, _ = world.reset(prompt, [0])
    for _ in range(3):
        states, _ = world.step(states, [action])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        states, _ = world.step(states, [action])
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times))


def engine_rate_apart(world_dir: Path, action: int, steps: int, precision: str = "auto") -> float:
    """engine_rate in a fresh process, so this process's server runs as a gateway's does."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(engine_rate, (world_dir, action, steps, precision))


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--window-size=1100,900", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def held_key_rate(server: PageServer, key: str, seconds: float, profile: Path) -> dict[str, float]:
    """Holds `key` on the page for `seconds` (after 1 s of warm-up) and counts the frames that arrived."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    arrow = {"right": Keys.ARROW_RIGHT, "left": Keys.ARROW_LEFT, "up": Keys.ARROW_UP, "down": Keys.ARROW_DOWN}[key]
    driver = browser(profile)
    try:
        driver.get(f"{server.url}/#token={TOKEN}")
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('#prompts img').length > 0 && "
            "[...document.querySelectorAll('#prompts img')].every(i => i.complete)"))
        driver.find_element(By.CSS_SELECTOR, '#prompts button[data-prompt="0"]').click()
        wait.until(lambda d: d.execute_script("return document.body.dataset.mode") == "playing")
        step = lambda: int(driver.execute_script("return document.getElementById('step').textContent"))  # noqa: E731
        ActionChains(driver).key_down(arrow).perform()
        time.sleep(1.0)
        t0, first = time.monotonic(), step()
        time.sleep(seconds)
        frames, elapsed = step() - first, time.monotonic() - t0
        hud = float(driver.execute_script("return document.body.dataset.fps || '0'"))
        ActionChains(driver).key_up(arrow).perform()
    finally:
        driver.quit()
    return {"page_frames_per_s": frames / elapsed, "hud_frames_per_s": hud, "frames": frames, "seconds": elapsed}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("worlds/demo"))
    parser.add_argument("--key", default="right", choices=["right", "left", "up", "down"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--engine-steps", type=int, default=40)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="the engine's precision, for the page's server and the engine's own rate alike; auto is "
                             "read as `genie play` reads it (int8 on a CPU with int8 dot products)")
    parser.add_argument("--profile-dir", type=Path, default=Path("/tmp/genie-bench-page-chromium"))
    args = parser.parse_args()
    for need in (CHROMIUM, CHROMEDRIVER):
        if not need.exists():
            sys.exit(f"error: {need} is missing: bash scripts/system-deps.sh installs chromium and chromium-driver")
    machine = setup_run(args)
    args.precision = single_process_precision(args.precision, "cpu")  # what `genie play` would run
    # No torch work on this thread: a second OpenMP team (this thread's beside the page server's model thread) halves
    # the server's rate, which a gateway process never does (see engine_rate).
    keys, _ = load_key_bindings(args.world, world_spec_of(args.world).num_actions)
    if keys.get(args.key) is None:
        sys.exit(f"error: {args.world} binds no latent to {args.key}")
    engine = engine_rate_apart(args.world, keys[args.key], args.engine_steps, args.precision)
    server = PageServer(args.world, TOKEN, backend_options={"precision": args.precision})
    server.start()
    try:
        page = held_key_rate(server, args.key, args.seconds, args.profile_dir)
    finally:
        server.stop()
    emit({"bench": "page_held_key", "world": str(args.world), "key": args.key, "latent": keys[args.key],
          "precision": args.precision,
          "engine_b1_frames_per_s": round(engine, 2), **{k: round(v, 2) for k, v in page.items()},
          "page_share_of_engine": round(page["page_frames_per_s"] / engine, 3)}, machine, args.out)


if __name__ == "__main__":
    main()
