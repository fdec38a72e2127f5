"""The course in a real browser: JupyterLab + headless Chromium, driven by playwright.

nbval runs the notebooks' code but no browser ever draws a widget, so it cannot see the
failures a class meets first: a slider that shows "Error displaying widget" (the JupyterLab
side of ipywidgets missing), a figure that never updates when the slider moves. This test
starts JupyterLab on a loopback port with a random token, opens a three-cell notebook built
here (no outputs, so everything on screen comes from this run) with the two explorers of
notebook 02 (``threshold_explorer``, ``crf_explorer``) on a rendered scene, runs every cell,
checks that the sliders rendered and no cell failed, moves the threshold slider with the
keyboard and checks that the figure changed. The course's own notebooks run under nbval. Screenshots go to ``$CONCEPTLAB_ARTIFACTS`` (default
``outputs/browser/``).

Needs Debian's Chromium (``apt-get install chromium``) and the ``playwright`` package
(``pip install playwright``; its own browsers are not used). Without them the test is
skipped, unless ``CONCEPTLAB_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets it), when it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "explorers.ipynb"
# The widgets of notebook 02 on a scene of the shapes world, with blurred true masks standing
# in for attention maps (no model: the browser, not the model, is under test here).
CELLS = [
    """import numpy as np
from scipy.ndimage import gaussian_filter
from conceptlab.shapes import world
sc = world.render_scene(world.sample_scene(seed=3, n_objects=2), size=64)
gt = sc.object_masks
maps = np.stack([gaussian_filter(m.astype(float), 4)[::4, ::4] for m in gt])
print(maps.shape)""",
    """from conceptlab.viz.widgets import threshold_explorer
threshold_explorer(sc.image, maps[0], gt[0])""",
    """from conceptlab.viz.widgets import crf_explorer
crf_explorer(sc.image, maps, gt)""",
]
CHROMIUM = os.environ.get("CONCEPTLAB_CHROMIUM", "/usr/bin/chromium")
# The flags a sandboxed, offline machine needs (without the networking ones Chromium keeps
# trying to reach Google's hosts).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_S = 180


def _requirements_or_skip():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        msg = "browser check needs " + " and ".join(missing)
        if os.environ.get("CONCEPTLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " (CONCEPTLAB_REQUIRE_BROWSER=1)")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_notebook(dst: Path) -> None:
    """The three cells, no outputs."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(dst))


@pytest.fixture
def jupyterlab(tmp_path):
    _requirements_or_skip()
    work = tmp_path / "lab"
    work.mkdir()
    _fresh_notebook(work / NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel must use the inline backend, not Agg
    settings = tmp_path / "settings"
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(settings))
    # Every cell kept in the DOM (JupyterLab 4 otherwise detaches cells scrolled out of
    # view), and no news pop-up over the notebook.
    for plugin, value in [("notebook-extension/tracker", {"windowingMode": "none"}),
                          ("apputils-extension/notification", {"fetchNews": "false"})]:
        f = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    with open(tmp_path / "jupyterlab.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
             f"--port={port}", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
             "--allow-root", "--LabApp.check_for_updates_class="
             "jupyterlab.NeverCheckForUpdate"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        log.flush()
                        pytest.fail("JupyterLab did not start:\n"
                                    + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                    time.sleep(0.5)
            yield url, token, work
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


# JavaScript run in the page: the notebook panel JupyterLab shows (window.jupyterapp is there
# because of --LabApp.expose_app_in_browser).
_PANEL = "window.jupyterapp && window.jupyterapp.shell.currentWidget"
_STATE = f"""() => {{
  const panel = {_PANEL};
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  for (const cell of panel.content.widgets) {{
    if (cell.model.type !== 'code') continue;
    const outs = cell.model.outputs.toJSON();
    cells.push({{n: cell.model.executionCount,
                 errors: outs.filter(o => o.output_type === 'error')
                             .map(o => o.ename + ': ' + o.evalue)}});
  }}
  return {{kernel: kernel ? kernel.status : null, cells}};
}}"""


def _wait(page, predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = page.evaluate(_STATE)
        if state is not None and predicate(state):
            return state
        page.wait_for_timeout(500)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last state: {state}")


def _output_image(widget) -> str:
    """The src of the figure the interact widget shows (a data: URL of the PNG)."""
    img = widget.locator(".widget-output img").first
    img.wait_for(state="visible", timeout=60_000)
    return img.get_attribute("src")


def test_explorer_sliders_render_and_move_the_figure(jupyterlab):
    from playwright.sync_api import sync_playwright

    url, token, _ = jupyterlab
    shots = Path(os.environ.get("CONCEPTLAB_ARTIFACTS", ROOT / "outputs" / "browser"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
            _wait(page, lambda s: s["kernel"] == "idle" and s["cells"], 120, "the kernel")

            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            state = _wait(page, lambda s: s["kernel"] == "idle"
                          and all(c["n"] is not None for c in s["cells"]),
                          RUN_ALL_TIMEOUT_S, "every cell to run")
            errors = [e for c in state["cells"] for e in c["errors"]]
            assert not errors, f"cells failed in JupyterLab: {errors}"

            page.screenshot(path=str(shots / "02_full_page.png"), full_page=False)
            body = page.locator("body").inner_text()
            assert "Error displaying widget" not in body, "a widget did not render"
            # threshold_explorer (1 slider + 1 dropdown) and crf_explorer (5 sliders)
            sliders = page.locator(".jp-Notebook .widget-slider")
            assert sliders.count() >= 6, f"expected >= 6 sliders, the DOM has {sliders.count()}"

            explorer = page.locator(".jp-Notebook .widget-interact").first
            explorer.scroll_into_view_if_needed()
            readout = explorer.locator(".widget-readout").first
            assert readout.inner_text().strip() == "0.50", explorer.inner_html()[:3000]
            before = _output_image(explorer)
            explorer.screenshot(path=str(shots / "02_threshold_0.50.png"))

            explorer.locator(".noUi-handle").first.focus()
            for _ in range(4):  # step 0.05: 0.50 -> 0.70
                page.keyboard.press("ArrowRight")
            deadline = time.time() + 90
            while _output_image(explorer) == before and time.time() < deadline:
                page.wait_for_timeout(500)
            _wait(page, lambda s: s["kernel"] == "idle", 60, "the slider's callback")
            after = _output_image(explorer)
            explorer.screenshot(path=str(shots / "02_threshold_0.70.png"))
            assert readout.inner_text().strip() == "0.70", readout.inner_text()
            assert after != before, "moving the slider did not change the figure"
        finally:
            browser.close()
