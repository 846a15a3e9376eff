"""The play page in real headless Chromium (selenium), against the web app served from a background thread.

Needs Debian's `chromium` and `chromium-driver`; skipped without them unless GENIE_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genie.worlds import apply_action_names_from_report, load_prompts
from harness.page_server import PageServer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKEN = "page-test-token-0123456789"
WAIT_S = 10


@pytest.fixture(scope="module", autouse=True)
def _browser_installed() -> None:
    """Runs first, so a machine without a browser skips before the tiny world is trained."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"headless Chromium is not available (missing {', '.join(missing)}; apt-get install chromium chromium-driver)"
        if os.environ.get("GENIE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GENIE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def keyed_world(trained_world_dir, tmp_path_factory) -> Path:
    """The tiny world (4 latents) with an eval mapping that binds right -> 3 (28 of 40 transitions press RIGHT) and
    up -> 1 (30 of 40 press UP), and leaves left and down unbound."""
    import shutil

    world = shutil.copytree(trained_world_dir, tmp_path_factory.mktemp("keyed") / "world")
    rows = [[2, 2, 2, 34], [2, 30, 2, 6], [2, 2, 2, 34], [2, 4, 28, 6]]  # over LEFT, UP, RIGHT, NOOP
    mapping = {"true_names": ["LEFT", "UP", "RIGHT", "NOOP"],
               "latents": [{"latent": a, "count": sum(r), "counts": r} for a, r in enumerate(rows)]}
    apply_action_names_from_report(world, {"lam": {"mapping": mapping}})
    return world


@pytest.fixture(scope="module")
def server(keyed_world) -> Iterator[PageServer]:
    srv = PageServer(keyed_world, TOKEN)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                "--window-size=1100,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    drv = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


# --- helpers ---------------------------------------------------------------------------------------------


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def text(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def frame_src(driver) -> str:
    return driver.execute_script("return document.getElementById('frame').getAttribute('src') || ''")


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def open_page(driver, server, fragment: str = f"#token={TOKEN}") -> None:
    driver.get("about:blank")  # a change of fragment alone would not reload the page
    driver.get(f"{server.url}/{fragment}")


def start_session(driver, server: PageServer, prompt: int) -> str:
    """Clicks a prompt thumbnail once all have loaded; returns the new session's id."""
    from selenium.webdriver.common.by import By

    loaded = "return [...document.querySelectorAll('#prompts img')].filter(i => i.complete && i.naturalWidth > 0).length"
    count = len(load_prompts(server.world_dir))
    wait(driver, lambda d: d.execute_script(loaded) == count, "prompt thumbnails did not load")
    before = driver.execute_script("return document.body.dataset.session || ''")
    driver.find_element(By.CSS_SELECTOR, f'#prompts button[data-prompt="{prompt}"]').click()
    return wait_new_session(driver, before)


def wait_new_session(driver, old: str) -> str:
    """Waits until the page plays a session other than `old`, showing its first frame; returns its id."""
    script = "return document.body.dataset.mode === 'playing' ? document.body.dataset.session : ''"
    wait(driver, lambda d: d.execute_script(script) not in ("", old), "no new session started")
    assert text(driver, "step") == "0" and frame_src(driver).startswith("data:image/png;base64,")
    return driver.execute_script(script)


def step_to(driver, step: int, src_before: str) -> str:
    wait(driver, lambda d: text(d, "step") == str(step) and frame_src(d) != src_before,
         f"step counter did not reach {step} with a new frame (shows {text(driver, 'step')})")
    return frame_src(driver)


# --- tests -----------------------------------------------------------------------------------------------


def test_keys_and_buttons_step_the_world_in_order(driver, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(driver, server)
    start_session(driver, server, prompt=2)
    assert "Genie" in driver.title
    legend = text(driver, "legend")
    assert "latent actions 0…3" in legend and "restart" in legend
    shown = driver.execute_script(
        "return [...document.querySelectorAll('#legend li[data-key]')].map(li => [li.dataset.key, li.className, "
        "li.textContent, getComputedStyle(li).opacity])")
    assert [(key, cls) for key, cls, _, _ in shown] == [("left", "unbound"), ("right", ""), ("up", ""),
                                                        ("down", "unbound")]
    assert "action 3" in shown[1][2] and "70% of its moves press right" in shown[1][2] and "75%" in shown[2][2]
    assert "unbound" in shown[0][2] and float(shown[0][3]) < 1 == float(shown[1][3])  # unbound keys are greyed
    buttons = driver.find_elements(By.CSS_SELECTOR, "#actions button")
    assert len(buttons) == server.service.spec.num_actions  # 4 in the tiny world
    assert driver.execute_script("return getComputedStyle(document.getElementById('frame')).imageRendering") == "pixelated"
    src = frame_src(driver)
    server.stepped.clear()

    press(driver, "2")  # number keys 1..A -> actions 0..A-1
    src = step_to(driver, 1, src)
    assert text(driver, "last-action") == "action 1"
    press(driver, Keys.ARROW_RIGHT)  # a bound arrow sends its latent
    src = step_to(driver, 2, src)
    assert text(driver, "last-action") == "action 3"
    press(driver, Keys.ARROW_DOWN)  # an unbound arrow sends nothing and says so
    wait(driver, lambda d: "unbound" in text(d, "message"), "no word that the key is unbound")
    assert text(driver, "step") == "2" and server.stepped == [1, 3]
    buttons[2].click()
    src = step_to(driver, 3, src)

    # Faster than the world answers: queued, in order; the unbound arrows in between send nothing.
    press(driver, "1", Keys.ARROW_LEFT, Keys.ARROW_RIGHT, "4", Keys.ARROW_UP, Keys.ARROW_DOWN, "1")
    step_to(driver, 8, src)
    assert server.stepped == [1, 3, 2, 0, 3, 3, 1, 0]
    assert driver.execute_script("return document.body.dataset.mode") == "playing"

    shot = tmp_path / "play.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size[0] >= 800 and len(np.unique(np.asarray(im.convert("L")))) > 10  # a rendered page, not a blank one


def test_a_held_key_steps_the_world_until_released_and_shows_the_frame_rate(driver, server):
    """Held down (one keydown, no auto-repeat, as WebDriver sends it), a bound arrow steps the world again as soon as
    each frame arrives, and stops when released; the HUD shows the frames/s a held key reaches."""
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(driver, server)
    start_session(driver, server, prompt=1)
    server.stepped.clear()
    ActionChains(driver).key_down(Keys.ARROW_RIGHT).perform()
    wait(driver, lambda d: int(text(d, "step")) >= 6, "a held key did not keep stepping")
    t0, first = time.monotonic(), int(text(driver, "step"))
    time.sleep(1.0)
    held_steps, held_s = int(text(driver, "step")) - first, time.monotonic() - t0
    ActionChains(driver).key_up(Keys.ARROW_RIGHT).perform()
    time.sleep(0.3)  # at most the step in flight lands after the release
    stopped = int(text(driver, "step"))
    time.sleep(0.5)
    assert int(text(driver, "step")) == stopped, "the world kept stepping after the key was released"
    assert set(server.stepped) == {3} and len(server.stepped) == stopped  # right's latent, once per frame shown
    rate = float(driver.execute_script("return document.body.dataset.fps"))
    print(f"held key: {held_steps / held_s:.1f} steps/s over {held_s:.2f} s; the HUD showed {rate:.1f} frames/s")
    assert held_steps >= 3 and rate > 0 and text(driver, "fps") not in ("", "–")
    # Two keys held: the newer one repeats; releasing it goes back to the older one.
    server.stepped.clear()
    ActionChains(driver).key_down(Keys.ARROW_RIGHT).key_down(Keys.ARROW_UP).perform()
    wait(driver, lambda d: server.stepped.count(1) >= 3, "the newer held key did not take over")
    ActionChains(driver).key_up(Keys.ARROW_UP).perform()
    count = len(server.stepped)
    wait(driver, lambda d: len(server.stepped) >= count + 3, "releasing the newer key stopped the older one")
    ActionChains(driver).key_up(Keys.ARROW_RIGHT).perform()
    assert server.stepped[-1] == 3


def test_closed_session_shows_error_and_restart_recovers(driver, server):
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    session = start_session(driver, server, prompt=0)
    server.call(server.service.close("player", session))  # as if it had expired

    press(driver, "1")
    wait(driver, lambda d: "expired or was closed" in text(d, "message"), "no error message for a closed session")
    assert driver.execute_script("return document.body.dataset.mode") == "error"
    restart = driver.find_element(By.ID, "restart")
    assert restart.is_displayed()

    restart.click()
    session = wait_new_session(driver, session)
    assert text(driver, "message") != "" and "expired" not in text(driver, "message")
    press(driver, "R")  # R restarts too
    wait_new_session(driver, session)
    src = frame_src(driver)
    press(driver, "3")
    step_to(driver, 1, src)

    driver.get("about:blank")  # leaving the page closes its session; restarts closed the ones before
    wait(driver, lambda d: server.call(server.service.store.count("player")) == 0, "sessions left open after leaving the page")


def test_without_token_the_page_asks_for_one(driver, server):
    from selenium.webdriver.common.by import By

    open_page(driver, server, fragment="")
    form = driver.find_element(By.ID, "token-form")
    wait(driver, lambda d: form.is_displayed(), "no token form")
    driver.find_element(By.ID, "token-input").send_keys("not-the-right-token-at-all")
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait(driver, lambda d: "token was refused" in text(d, "message"), "a bad token was not reported")

    driver.find_element(By.ID, "token-input").clear()
    driver.find_element(By.ID, "token-input").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait(driver, lambda d: d.find_element(By.ID, "play").is_displayed(), "the page did not connect")
    assert driver.current_url.endswith(f"#token={TOKEN}")
    start_session(driver, server, prompt=1)


def test_the_page_offers_the_catalogue_and_plays_the_world_picked(driver, keyed_world, trained_world_dir, tmp_path):
    from selenium.webdriver.support.ui import Select

    from genie.catalog import DirectoryCatalog

    catalog = DirectoryCatalog(tmp_path / "registry")
    catalog.publish(trained_world_dir, "plain")
    catalog.publish(keyed_world, "keyed")
    catalog.publish(keyed_world, "keyed")
    catalog.retire("keyed", 2)  # retired: not offered
    srv = PageServer(keyed_world, TOKEN, registry=catalog.root)
    srv.start()
    try:
        open_page(driver, srv)
        wait(driver, lambda d: d.execute_script("return !document.getElementById('worlds').hidden"), "no world picker")
        select = Select(driver.find_element("id", "world-select"))
        assert [o.get_attribute("value") for o in select.options] == ["keyed", "keyed@1", "plain", "plain@1"]
        shown = "return document.body.dataset.worldShown"
        wait(driver, lambda d: d.execute_script(shown) == "keyed", "the default world was not shown")
        select.select_by_value("plain")
        wait(driver, lambda d: d.execute_script(shown) == "plain", "the picked world was not shown")
        start_session(driver, srv, 1)
        assert driver.execute_script("return document.body.dataset.world") == "plain@1"
        select.select_by_value("keyed@1")
        wait(driver, lambda d: d.execute_script(shown) == "keyed@1", "the picked version was not shown")
        start_session(driver, srv, 0)
        assert driver.execute_script("return document.body.dataset.world") == "keyed@1"
    finally:
        srv.stop()
