"""The explorer as a user meets it: JupyterLab started headless on localhost, a notebook holding
the text routing explorer opened in Debian's chromium through Playwright, the cell run, a control
changed, and the plot checked to have changed (the image bytes differ). The screenshots are kept
under build/browser/ (explorer.png before the change: docs/img/explorer.png in the README).

Needs /usr/bin/chromium (scripts/install_browser.sh), the playwright package and jupyterlab with
ipywidgets; skipped with the reason otherwise."""

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

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "build" / "browser"

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (bash scripts/install_browser.sh installs it)"
    for mod in ("playwright", "jupyterlab", "ipywidgets", "ipykernel"):
        try:
            __import__(mod)
        except ImportError:
            return f"the {mod} package is missing (pip install {mod})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    src = ("from routerlib.widgets import text_routing_explorer\n"
           f"explorer = text_routing_explorer(results={str(ROOT / 'results')!r}, length=24)\n"
           "explorer")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "explorer",
                     "metadata": {}, "outputs": [], "source": src}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture
def jupyterlab(tmp_path):
    """(base url, token) of a JupyterLab server on a free localhost port, in tmp_path with its
    own settings, workspaces and runtime folders; stopped after the test."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), IPYTHONDIR=str(tmp_path / "ipy"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)  # the explorer offers the torch backend only on a CPU
    # no "get notified about Jupyter news?" toast over the page, no update checks
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    root = tmp_path / "nb"
    root.mkdir()
    _notebook(root / "explorer.ipynb")
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + (tmp_path / "jupyter.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_explorer_in_jupyterlab(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
            viewport={"width": 1500, "height": 1300})
        try:
            page = browser.new_page()
            page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}", timeout=60_000)
            cell = page.locator(".jp-Notebook .jp-Cell").first
            cell.locator(".jp-InputArea-editor").wait_for(timeout=60_000)
            # the kernel must be connected before the cell runs, else the request is lost
            page.get_by_text("| Idle").first.wait_for(timeout=60_000)
            prompt = cell.locator(".jp-InputPrompt")
            for _ in range(3):  # run the cell; again if it did not start (no [*] or [1])
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Control+Enter")
                try:
                    page.wait_for_function(
                        "el => /\\[(\\*|\\d+)\\]/.test(el.textContent)",
                        arg=prompt.element_handle(), timeout=10_000)
                    break
                except Exception:
                    continue
            image = page.locator(".jp-OutputArea-output img.widget-image").first
            image.wait_for(state="visible", timeout=90_000)
            output = page.locator(".jp-OutputArea-output").first
            src = image.get_attribute("src")
            before = image.screenshot()
            text_before = output.inner_text()
            assert "drop rate" in text_before
            SHOTS.mkdir(parents=True, exist_ok=True)
            output.screenshot(path=str(SHOTS / "explorer.png"))

            # change a control: expert choice routing (no slot is dropped by construction)
            strategy = page.locator(".widget-dropdown", has_text="strategy").locator("select")
            strategy.select_option("expert_choice")
            page.wait_for_function(
                "([sel, old]) => document.querySelector(sel).getAttribute('src') !== old",
                arg=[".jp-OutputArea-output img.widget-image", src], timeout=60_000)
            page.wait_for_timeout(300)  # the new image decodes
            after = image.screenshot()
            assert after != before, "the plot did not change after the control changed"
            assert output.inner_text() != text_before
            assert "expert_choice" in strategy.input_value()

            output.screenshot(path=str(SHOTS / "explorer_expert_choice.png"))
            page.screenshot(path=str(SHOTS / "jupyterlab.png"))
        except Exception:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "failure.png"))  # what the user would have seen
            raise
        finally:
            browser.close()
    assert (SHOTS / "explorer.png").stat().st_size > 10_000
