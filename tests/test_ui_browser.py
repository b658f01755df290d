"""`peftkit ui` in a real headless Chromium (Playwright): what a person sees on each page, checked against the run
folders' own files; a screenshot of each page goes to test-artifacts/ui/."""

from __future__ import annotations

import json
import re

import pytest

from ui_fixtures import ServeProcess, UiProcess, make_runs, shot, ui_page
from ui_helpers import report

try:  # never a silent skip: without playwright the browser tests fail with the fix
    from playwright import sync_api
except ImportError:  # pragma: no cover
    sync_api = None


@pytest.fixture(autouse=True, scope="module")
def _playwright_installed():
    if sync_api is None:
        pytest.fail("playwright is missing: pip install -e '.[test]' (make install-test), then the browser tests run "
                    "Debian's chromium")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    runs = make_runs(tmp_path_factory.mktemp("ui"))
    with ui_page(runs) as (url, page):
        yield runs, url, page


def test_runs_table_lists_every_run_with_its_metric_and_sorts_and_filters(site):
    runs, url, page = site
    page.goto(url + "/")
    shot(page, "runs")
    rows = page.locator("#runs tbody tr")
    assert sorted(rows.nth(i).get_attribute("data-run") for i in range(rows.count())) == ["r4", "r8"]
    for name in ("r4", "r8"):
        dev = report(runs / name)["dev"]
        row = page.locator(f'#runs tbody tr[data-run="{name}"]')
        assert f"accuracy {dev['accuracy']:.4g}" in row.inner_text()
        assert "finished" in row.inner_text() and "lora" in row.inner_text()
    page.fill("#filter", "r8")
    assert page.locator("#runs tbody tr:visible").count() == 1
    assert page.locator("#count").inner_text() == "1 of 2 runs"
    page.fill("#filter", "")
    page.click('th[data-key="path"]')
    page.click('th[data-key="path"]')  # descending
    assert page.locator("#runs tbody tr").first.get_attribute("data-run") == "r8"
    assert page.locator("#studies").inner_text().count("study") >= 1


def test_run_page_chart_has_a_point_per_history_record_and_the_confusion_matrix_of_the_report(site):
    runs, url, page = site
    stored = report(runs / "r4")
    page.goto(url + "/run?p=r4")
    shot(page, "run")
    assert page.locator("#loss-chart circle.point").count() == len(stored["history"])
    steps = [float(page.locator("#loss-chart circle.point").nth(i).get_attribute("data-x"))
             for i in range(len(stored["history"]))]
    assert sorted(steps) == sorted(float(h["step"]) for h in stored["history"])
    matrix = stored["dev"]["confusion_matrix"]
    cells = page.locator("#confusion-dev g.cell")
    assert cells.count() == len(matrix) ** 2
    for k in range(cells.count()):
        cell = cells.nth(k)
        i, j = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
        assert float(cell.text_content()) == matrix[i][j]  # the number the cell shows
    table = page.locator("#per-class-dev").inner_text()
    for label, values in stored["dev"]["per_class"].items():
        assert re.search(rf"{label}\s+{values['precision']:.4g}\s+{values['recall']:.4g}", table)
    assert "lora" in page.locator("#config").inner_text()
    assert f"{stored['trainable_parameters']:,}" in page.locator("#summary").inner_text()


def test_compare_shows_both_runs_and_their_config_difference(site):
    runs, url, page = site
    page.goto(url + "/")
    page.check('input[value="r4"]')
    page.check('input[value="r8"]')
    page.click("text=compare selected")
    page.wait_for_selector("#compare-metrics")
    shot(page, "compare")
    header = page.locator("#compare-metrics tr").first.inner_text()
    assert "r4" in header and "r8" in header
    series = {page.locator("#compare-loss circle.point").nth(i).get_attribute("data-series")
              for i in range(page.locator("#compare-loss circle.point").count())}
    assert {"r4 train", "r8 train", "r4 dev", "r8 dev"} <= series
    diff = page.locator("#config-diff").inner_text()
    assert "lora.r" in diff and "learning_rate" in diff and "epochs" not in diff


def test_search_page_shows_trials_best_trial_and_history(site):
    runs, url, page = site
    page.goto(url + "/searches")
    page.click("#studies a")
    page.wait_for_selector("#trials")
    shot(page, "search")
    summary = json.loads((runs / "study" / "summary.json").read_text())
    assert page.locator("#trials tr").count() == 1 + len(summary["trials"])
    assert "best trial 001" in page.locator("#best").inner_text()
    assert page.locator("#search-history circle.point").count() == 2 * len(summary["trials"])  # values + best so far
    image = page.locator('img[alt="study/plots/importances.png"]')
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0  # served from the study folder and drawn


def test_runs_table_picks_up_a_run_that_starts_training(site):
    import os
    import shutil
    import socket
    import time

    runs, url, page = site
    page.goto(url + "/")
    late = runs / "late"
    late.mkdir()
    try:
        (late / "config.yaml").write_text("method: dora\nmodel: tiny-bert\n", encoding="utf-8")
        (late / "live.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                                    "step": 3, "total_steps": 12, "started": time.time(),
                                                    "history": []}), encoding="utf-8")
        row = page.wait_for_selector('#runs tbody tr[data-run="late"]', timeout=20000)  # no reload: the page polls
        assert "running (3/12)" in row.inner_text() and "dora" in row.inner_text()
    finally:
        shutil.rmtree(late)


def test_try_it_gives_the_label_of_peftkit_predict(site, capsys):
    runs, url, page = site
    text = "my card was stolen please block it"
    expected = predicted_labels(runs, text, capsys)
    page.goto(url + "/try")
    page.fill("#try-text", text)
    page.check('input[value="r4"]')
    page.check('input[value="r8"]')
    page.click("#try-submit")
    page.wait_for_selector("#answers")
    shot(page, "try")
    for name in ("r4", "r8"):
        assert page.locator(f'#answers tr[data-run="{name}"] td.label').inner_text() == expected[name]


def predicted_labels(runs, text: str, capsys) -> dict[str, str]:
    """What `peftkit predict --run <run> --text <text>` prints as the label, per run."""
    from peftkit.cli import main

    labels = {}
    for name in ("r4", "r8"):
        capsys.readouterr()
        assert main(["predict", "--run", str(runs / name), "--text", text]) == 0
        labels[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"]
    return labels


def test_try_it_through_a_running_server_gives_the_label_of_peftkit_predict(site, capsys):
    runs, _, page = site
    text = "when do you open on sunday"
    expected = predicted_labels(runs, text, capsys)
    server = ServeProcess(runs.parent / "tiny-bert", runs, "--pooling", "mean")
    try:
        ui = UiProcess(runs, "--server", server.url)
        try:
            page.goto(ui.url + "/try")
            assert server.url in page.inner_text("#try-form")
            page.fill("#try-text", text)
            page.check('input[value="r4"]')
            page.check('input[value="r8"]')
            page.click("#try-submit")
            page.wait_for_selector("#answers")
            for name in ("r4", "r8"):
                assert page.locator(f'#answers tr[data-run="{name}"] td.label').inner_text() == expected[name]
        finally:
            ui.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/run?p=../..", "/run?p=%2E%2E%2F%2E%2E%2Fetc", "/file?p=/etc/passwd",
                                  "/file?p=..%2F..%2F..%2Fetc%2Fpasswd", "/search?p=..", "/static/..%2F..%2Fcli.py"])
def test_a_path_outside_the_runs_folder_is_refused(site, path):
    runs, url, page = site
    answer = page.goto(url + path)
    assert answer.status in (400, 404)
    assert "root:" not in page.content() and "def main" not in page.content()
