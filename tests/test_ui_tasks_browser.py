"""`peftkit ui` in a real headless Chromium for the other tasks: a token-classification (NER) run of a tiny BERT and a
causal-lm run of a tiny chat LLaMA. Each page is checked against the run's own report.json, and the try-it box
against `peftkit predict` / `peftkit generate`, in process and through a running `peftkit serve` (the tag route of
a token-classification server, the OpenAI endpoint of a causal-lm server)."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request

import pytest

from ui_fixtures import ServeProcess, UiProcess, shot, ui_page
from ui_helpers import report, train_causal_run, train_ner_run

try:  # never a silent skip: without playwright the browser tests fail with the fix
    from playwright import sync_api
except ImportError:  # pragma: no cover
    sync_api = None

NER, CHAT = "ner/tagger", "causal/chat"
NER_TEXT = "yesterday carol went to new york ."
CHAT_TEXT = "cancel my order please"
GENERATED = "64"  # the try-it box generates 64 new tokens at most (tryit.GENERATED_TOKENS)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if sync_api is None:
        pytest.fail("playwright is missing: pip install -e '.[test]' (make install-test), then the browser tests run "
                    "Debian's chromium")
    root = tmp_path_factory.mktemp("ui-tasks")
    runs = root / "runs"
    train_ner_run(root, runs / NER)
    train_causal_run(root, runs / CHAT)
    with ui_page(runs) as (url, page):
        yield root, url, page


def cli_json(capsys, *args: str) -> dict:
    from peftkit.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def predicted_entities(root, text: str, capsys) -> str:
    """The entities `peftkit predict --run <ner run> --text TEXT` prints, as the try-it box writes them."""
    row = cli_json(capsys, "predict", "--run", str(root / "runs" / NER), "--text", text)
    assert row["entities"], "the tiny tagger should find entities in this text"
    return ", ".join(f'{e["text"]} ({e["type"]})' for e in row["entities"])


def generated(root, text: str, capsys) -> str:
    """What `peftkit generate --run <causal run> --prompt TEXT` prints (greedy), as many tokens as the box asks."""
    from peftkit.cli import main

    capsys.readouterr()
    assert main(["generate", "--run", str(root / "runs" / CHAT), "--prompt", text, "--max_new_tokens", GENERATED]) == 0
    return capsys.readouterr().out.strip()


def answer_of(page, run: str) -> str:
    return page.locator(f'#answers tr[data-run="{run}"] td.label').inner_text()


def ask(page, url: str, text: str, runs: list[str]) -> None:
    page.goto(url + "/try")
    page.fill("#try-text", text)
    for run in runs:
        page.check(f'input[value="{run}"]')
    page.click("#try-submit")
    page.wait_for_selector("#answers")


# ----------------------------------------------------------------------------------------------------- NER
def test_ner_run_page_per_entity_type_table_and_heatmap_equal_the_report(site):
    root, url, page = site
    stored = report(root / "runs" / NER)
    page.goto(url + "/run?" + urllib.parse.urlencode({"p": NER}))
    shot(page, "ner-run")
    dev = stored["dev"]
    assert page.locator("#loss-chart circle.point").count() == len(stored["history"])
    table = page.locator("#per-class-dev")
    assert table.locator("th").first.inner_text() == "entity type"
    rows = table.locator("tr")
    assert rows.count() == 1 + len(dev["per_type"])
    for name, values in dev["per_type"].items():
        line = table.locator("tr", has_text=name).inner_text()
        assert re.fullmatch(rf"{name}\s+{values['precision']:.4g}\s+{values['recall']:.4g}\s+"
                            rf"{values['f1-score']:.4g}\s+{values['support']:g}", line.strip()), line
    matrix = dev["confusion_matrix"]
    cells = page.locator("#confusion-dev g.cell")
    assert cells.count() == len(matrix) ** 2 and any(any(row) for row in matrix)
    for k in range(cells.count()):
        cell = cells.nth(k)
        i, j = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
        assert float(cell.text_content()) == matrix[i][j]
    heat = page.locator("#confusion-dev").text_content()
    for name in dev["entity_types"]:  # the axes are the entity types (and "(none)"), not the tags
        assert name in heat
    assert "B-person" not in heat
    assert re.search(rf"f1\s+{dev['f1']:.4g}", page.locator("#summary").inner_text())


def test_ner_try_it_shows_the_entities_of_peftkit_predict(site, capsys):
    root, url, page = site
    expected = predicted_entities(root, NER_TEXT, capsys)
    ask(page, url, NER_TEXT, [NER])
    shot(page, "ner-try")
    assert answer_of(page, NER) == expected


def test_ner_try_it_through_a_tag_server_shows_the_entities_of_peftkit_predict(site, capsys):
    root, _, page = site
    expected = predicted_entities(root, NER_TEXT, capsys)
    server = ServeProcess(root / "tiny-bert", root / "runs" / "ner", "--task", "token-classification",
                          "--max_length", "16")
    try:
        ui = UiProcess(root / "runs", "--server", server.url)
        try:
            ask(page, ui.url, NER_TEXT, ["tagger"])
            assert "token-classification" in page.inner_text("#try-form")
            assert answer_of(page, "tagger") == expected
        finally:
            ui.stop()
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------- causal LM
def test_causal_run_page_loss_and_perplexity_curves_and_generations_equal_the_report(site):
    root, url, page = site
    stored = report(root / "runs" / CHAT)
    history = stored["history"]
    page.goto(url + "/run?" + urllib.parse.urlencode({"p": CHAT}))
    shot(page, "causal-run")
    assert page.locator("#loss-chart circle.point").count() == len(history)  # train and dev loss records
    perplexity = [h for h in history if "dev_perplexity" in h]
    points = page.locator('#metric-chart circle.point[data-series="perplexity"]')
    assert len(perplexity) == 3 and points.count() == len(perplexity)
    assert page.locator("#metric-chart .chart-title").text_content() == "dev perplexity"
    for k, record in enumerate(perplexity):
        assert float(points.nth(k).get_attribute("data-y")) == pytest.approx(record["dev_perplexity"], rel=1e-5)
        assert float(points.nth(k).get_attribute("data-x")) == record["step"]
    base_vs = page.locator("#base-vs-adapted").inner_text()
    assert f"{stored['base_dev']['perplexity']:.4g}" in base_vs and f"{stored['dev']['perplexity']:.4g}" in base_vs
    examples = stored["generation"]["examples"]
    rows = page.locator("#generations tr")
    assert rows.count() == 1 + len(examples)
    for k, example in enumerate(examples):
        cells = rows.nth(k + 1).locator("td")
        assert [cells.nth(c).inner_text() for c in range(4)] == [
            example[key].strip() for key in ("prompt", "reference", "base", "adapted")]
    assert any(e["base"] != e["adapted"] for e in examples)  # base and adapted differ: the table tells them apart


def test_causal_try_it_generates_what_peftkit_generate_gives(site, capsys):
    root, url, page = site
    expected = generated(root, CHAT_TEXT, capsys)
    assert expected  # the trained adapter answers something
    ask(page, url, CHAT_TEXT, [CHAT])
    shot(page, "causal-try")
    assert answer_of(page, CHAT) == expected


def test_causal_try_it_through_the_openai_server_shows_what_a_direct_request_gives(site, capsys):
    root, _, page = site
    server = ServeProcess(root / "tiny-llama", root / "runs" / "causal", "--task", "causal-lm")
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": CHAT_TEXT}], "temperature": 0,
                "max_tokens": int(GENERATED)}
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            direct = json.loads(answer.read())["choices"][0]["message"]["content"]
        ui = UiProcess(root / "runs", "--server", server.url)
        try:
            ask(page, ui.url, CHAT_TEXT, ["chat"])
            shot(page, "causal-try-server")
            assert server.url in page.inner_text("#try-form") and "causal-lm" in page.inner_text("#try-form")
            assert answer_of(page, "chat") == direct.strip()
        finally:
            ui.stop()
    finally:
        server.stop()
    assert direct.strip() == generated(root, CHAT_TEXT, capsys)  # the server's greedy answer is peftkit generate's
