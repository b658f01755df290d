"""A folder of tiny runs (two LoRA ranks), a search folder whose trials point at them, and a running `peftkit ui`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ui_helpers import report, train_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"


def make_runs(root: Path) -> Path:
    """root/runs with runs r4 and r8 and a search folder study/ (summary.json as `peftkit search` writes it)."""
    first = train_run(root, "r4", lora={"r": 4}, learning_rate=5e-3, epochs=3)
    second = train_run(root, "r8", lora={"r": 8}, learning_rate=1e-2, epochs=3)
    study = root / "runs" / "study"
    study.mkdir()
    trials = [{"number": i, "state": "COMPLETE", "params": {"lora.r": r}, "values": [report(run)["dev"]["accuracy"] + i * 0.01],
               "last_reported": None, "seconds": 3.0 + i, "folder": str(run), "retry_of": None}
              for i, (r, run) in enumerate([(4, first), (8, second)])]
    summary = {"study": "search", "objectives": ["accuracy"], "directions": ["maximize"], "trials": trials,
               "best": [{k: trials[1][k] for k in ("number", "values", "params", "folder")}], "states": {"COMPLETE": 2}}
    (study / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (study / "plots").mkdir()  # stands in for Optuna's importance plot: a PNG the page must show
    (study / "plots" / "importances.png").write_bytes((first / "plots" / "loss.png").read_bytes())
    return root / "runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeftkitProcess:
    """A `peftkit` command serving HTTP on a free port, started and waited for until ``health`` answers."""

    def __init__(self, args: list[str], health: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", *args, "--port", str(self.port)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peftkit {args[0]} exited: {self.process.stdout.read().decode()}")
            try:
                urllib.request.urlopen(self.url + health, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"peftkit {args[0]} did not answer within 120 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class UiProcess(PeftkitProcess):
    """`peftkit ui` over the run folders under ``runs``; ``args``: more options."""

    def __init__(self, runs: Path, *args: str) -> None:
        super().__init__(["ui", "--runs", str(runs), *args], "/api/runs")


CHROMIUM = "/usr/bin/chromium"


def browser_or_fail(playwright):
    """Debian's chromium (Playwright's own download cannot work offline); missing: a failure that says the fix."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
                    "(`sudo apt-get install -y chromium`, which `make install-test` runs)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


class ServeProcess(PeftkitProcess):
    """`peftkit serve` of the tiny base with the adapters (run folders) under ``adapters``; ``args``: more options."""

    def __init__(self, base: Path, adapters: Path, *args: str) -> None:
        super().__init__(["serve", "--base", str(base), "--adapters", str(adapters), *args], "/health")


@contextlib.contextmanager
def ui_page(runs: Path):
    """(url, page): `peftkit ui` over ``runs`` and a headless chromium page, both closed afterwards."""
    from playwright import sync_api

    ui = UiProcess(runs)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = browser_or_fail(playwright)
            try:
                yield ui.url, browser.new_page(viewport={"width": 1200, "height": 900})
            finally:
                browser.close()
    finally:
        ui.stop()


def shot(page, name: str) -> None:
    """A full-page screenshot into the test artifacts."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
