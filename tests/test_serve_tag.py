"""`POST /v1/tag`: a token-classification server (in-process, FastAPI TestClient) answers the entity spans that
`peftkit predict --run RUN --text` prints, incl. a text that needs windows and a unicode text; hot load/unload,
the adapter list, metrics and hostile input."""

from __future__ import annotations

import pytest

import peftkit

from serve_tag_helpers import make_tag_run, predict_rows, same_rows
from workflow_helpers import tiny_model_dir

MAX_LENGTH = 16
TEXTS = ["Alice flew from Paris to New York on Monday.",
         # longer than MAX_LENGTH sub-tokens: split into windows and stitched back
         " ".join(["Bob met Carol in Berlin and then they drove to the old harbour of Hamburg"] * 3),
         "Zoë moved to Zürich — „São Paulo“ was 🌧️ too rainy, said Łukasz in Kraków."]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from fastapi.testclient import TestClient

    from peftkit.serve.app import create_app
    from peftkit.serve.model import ServedModel

    root = tmp_path_factory.mktemp("tag")
    model_dir = tiny_model_dir(root, dropout=0.1)
    adapters = root / "adapters"
    make_tag_run(adapters / "ner", model_dir, seed=1, max_length=MAX_LENGTH)
    make_tag_run(adapters / "ner_bitfit", model_dir, seed=2, config=peftkit.BitFitConfig(), max_length=MAX_LENGTH)
    make_tag_run(adapters / "staging" / "later", model_dir, seed=3, tags=["O", "B-x", "I-x"], max_length=MAX_LENGTH)
    served = ServedModel(model_dir, adapters, task="token-classification", max_length=MAX_LENGTH)
    assert [folder for folder, _ in served.discover()] == ["staging"]  # a folder of runs, not a run
    with TestClient(create_app(served, max_wait_ms=1)) as client:
        yield {"client": client, "adapters": adapters, "served": served}


def test_tag_answers_what_predict_prints(app):
    response = app["client"].post("/v1/tag", json={"adapter": "ner", "texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"] == "ner"
    predicted = predict_rows(app["adapters"] / "ner", TEXTS, MAX_LENGTH)
    same_rows(body["results"], predicted)
    assert sum(len(r["entities"]) for r in predicted) > 0  # spans to compare, not only empty lists
    for text, row in zip(TEXTS, body["results"]):  # offsets into the text as sent, unicode included
        assert row["text"] == text
        assert all(text[e["start"]:e["end"]] == e["text"] for e in row["entities"])


def test_texts_of_two_adapters_in_one_batch_equal_each_alone(app):
    import concurrent.futures

    client = app["client"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(client.post, "/v1/tag", json={"adapter": name, "texts": TEXTS})
                for name in ("ner", "ner_bitfit")]
        answers = [job.result() for job in jobs]
    for name, response in zip(("ner", "ner_bitfit"), answers):
        assert response.status_code == 200, response.text
        same_rows(response.json()["results"], predict_rows(app["adapters"] / name, TEXTS, MAX_LENGTH))


def test_hot_load_list_metrics_and_unload(app):
    client = app["client"]
    response = client.post("/v1/adapters", json={"name": "later", "path": "staging/later"})
    assert response.status_code == 201, response.text
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["later"]["labels"] == ["O", "B-x", "I-x"] and listed["ner"]["method"] == "lora"
    response = client.post("/v1/tag", json={"adapter": "later", "texts": TEXTS[:1]})
    assert response.status_code == 200, response.text
    same_rows(response.json()["results"], predict_rows(app["adapters"] / "staging" / "later", TEXTS[:1], MAX_LENGTH))
    metrics = client.get("/metrics").text
    assert 'peftkit_texts_total{adapter="later",task="token-classification"} 1.0' in metrics
    assert "classified" not in metrics  # a tagged text is not counted as classified
    assert client.delete("/v1/adapters/later").status_code == 200
    response = client.post("/v1/tag", json={"adapter": "later", "texts": TEXTS[:1]})
    assert response.status_code == 404 and "later" in response.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    ({"adapter": "ner", "texts": []}, 422, "nothing to tag"),
    ({"adapter": "ner", "texts": ["  "]}, 422, "text 0 is empty"),
    ({"adapter": "ner", "texts": ["x" * 10_001]}, 413, "limit"),
    ({"adapter": "ner", "texts": "Alice"}, 422, "texts"),
    ({"adapter": "ner"}, 422, "texts"),
    ({"adapter": "nobody", "texts": ["Alice"]}, 404, "no adapter named 'nobody'"),
    ({"adapter": "base", "texts": ["Alice"]}, 400, "no trained task head"),
    ({"adapter": "ner", "texts": [None]}, 422, "texts"),
])
def test_bad_requests_get_a_clear_4xx(app, body, status, words):
    response = app["client"].post("/v1/tag", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_lone_surrogates_and_plain_adapter_folders_are_refused(app, tmp_path):
    client = app["client"]
    response = client.post("/v1/tag", content=b'{"adapter": "ner", "texts": ["\\ud800 Alice"]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "surrogate" in response.json()["error"]
    plain = app["adapters"] / "plain"
    (plain).mkdir()
    for file in (app["adapters"] / "ner" / "adapter").iterdir():
        (plain / file.name).write_bytes(file.read_bytes())
    response = client.post("/v1/adapters", json={"name": "plain", "path": "plain"})
    assert response.status_code == 400 and "tags.json" in response.json()["error"], response.text
    assert "plain" not in app["served"].model.adapters  # nothing left behind
