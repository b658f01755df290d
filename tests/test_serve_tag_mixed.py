"""`peftkit serve --task auto`: classification and token-classification run folders on ONE encoder body; classify
and tag requests that arrive together share one forward of the body (each row its own adapter and head), and every
row equals its adapter served alone."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import peftkit

from serve_helpers import answer, make_run, run_probabilities
from serve_tag_helpers import make_tag_run, predict_rows, same_rows
from workflow_helpers import tiny_model_dir

MAX_LENGTH = 32  # serve_helpers.run_probabilities compares at this length
TAG_TEXTS = ["Alice flew from Paris to New York on Monday.",
             " ".join(["Bob met Carol in Berlin and then they drove to the old harbour of Hamburg"] * 3),
             "Zoë moved to Zürich — „São Paulo“ was too rainy, said Łukasz."]
CLASSIFY_TEXTS = ["my card was stolen", "when do you open on sunday"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peftkit.serve.model import ServedModel

    root = tmp_path_factory.mktemp("mixed")
    model_dir = tiny_model_dir(root, dropout=0.1)
    adapters = root / "adapters"
    make_run(adapters / "intents", model_dir, ["card", "hours", "refund"], seed=1)
    make_run(adapters / "sentiment", model_dir, ["neg", "pos"], seed=2)
    make_tag_run(adapters / "ner", model_dir, seed=3, max_length=MAX_LENGTH)
    make_tag_run(adapters / "ner_dora", model_dir, seed=4, max_length=MAX_LENGTH,
                 config=peftkit.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    served = ServedModel(model_dir, adapters, task="auto", max_length=MAX_LENGTH)
    assert served.discover() == []
    return {"served": served, "adapters": adapters}


def client_for(served, rows_per_forward: int):
    from fastapi.testclient import TestClient

    from peftkit.serve.app import create_app

    return TestClient(create_app(served, max_batch_size=rows_per_forward, max_wait_ms=10_000))


def count_body_forwards(served) -> list[int]:
    """The batch size of every forward of the shared encoder body."""
    calls: list[int] = []
    served.model.base_model.body.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    return calls


def test_classify_and_tag_requests_share_one_body_forward_and_equal_each_adapter_alone(setup):
    served, adapters = setup["served"], setup["adapters"]
    calls = count_body_forwards(served)
    requests = [("/v1/classify", {"adapter": "intents", "texts": CLASSIFY_TEXTS}),
                ("/v1/tag", {"adapter": "ner", "texts": TAG_TEXTS}),
                ("/v1/classify", {"adapter": "sentiment", "texts": CLASSIFY_TEXTS[:1]})]
    rows = sum(len(body["texts"]) for _, body in requests)
    with client_for(served, rows) as client, concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        responses = [job.result() for job in [pool.submit(client.post, route, json=body) for route, body in requests]]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len(calls) == 1 and calls[0] > rows  # ONE body forward; the long text needed several window rows
    torch.testing.assert_close(answer(responses[0]), run_probabilities(adapters / "intents", CLASSIFY_TEXTS),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(answer(responses[2]), run_probabilities(adapters / "sentiment", CLASSIFY_TEXTS[:1]),
                               atol=1e-6, rtol=0)
    predicted = predict_rows(adapters / "ner", TAG_TEXTS, MAX_LENGTH)
    assert sum(len(r["entities"]) for r in predicted) > 0
    same_rows(responses[1].json()["results"], predicted)


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone_in_logits(setup):
    """Row by row: a mixed classify+tag batch against each adapter's row run alone (classification 1e-6; a token
    row 2e-5: hundreds of word positions through a randomised head, the single-adapter path vs the grouped per-row
    one, whose matmuls sum in another order; 1.3e-5 seen)."""
    served = setup["served"]
    rows = [("intents", "my card was stolen"), ("ner", TAG_TEXTS[0]), ("sentiment", "refund please"),
            ("ner", TAG_TEXTS[1])]
    features = [served.task_of(name).encode_row(served.tokenizer, (text,), MAX_LENGTH) for name, text in rows]
    with torch.inference_mode():
        mixed = served._shared_forward(features, [name for name, _ in rows])
        for i, (name, _) in enumerate(rows):
            alone = served._shared_forward([features[i]], [name])[0]
            # the mixed batch pads heads to the widest (and sentences to the longest): the rest is this adapter's
            # probabilities, as the server answers (logits of ~1 differ by float32 rounding of other batch shapes)
            torch.testing.assert_close(mixed[i][tuple(slice(0, n) for n in alone.shape)].softmax(-1), alone.softmax(-1),
                                       atol=1e-6 if alone.dim() == 1 else 2e-5, rtol=0)


def test_an_adapter_that_cannot_mix_is_batched_alone(setup):
    served = setup["served"]
    calls = count_body_forwards(served)
    requests = [("/v1/tag", {"adapter": "ner_dora", "texts": TAG_TEXTS[:1]}),
                ("/v1/classify", {"adapter": "intents", "texts": CLASSIFY_TEXTS[:1]})]
    with client_for(served, 2) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = [job.result() for job in [pool.submit(client.post, route, json=body) for route, body in requests]]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len(calls) >= 2  # DoRA does not mix: its rows ran in a forward of their own
    same_rows(responses[0].json()["results"], predict_rows(setup["adapters"] / "ner_dora", TAG_TEXTS[:1], MAX_LENGTH))
    torch.testing.assert_close(answer(responses[1]), run_probabilities(setup["adapters"] / "intents", CLASSIFY_TEXTS[:1]),
                               atol=1e-6, rtol=0)


def test_a_request_to_the_other_tasks_route_is_refused(setup):
    with client_for(setup["served"], 1) as client:
        response = client.post("/v1/classify", json={"adapter": "ner", "texts": ["Alice"]})
        assert response.status_code == 422 and "/v1/tag" in response.json()["error"]
        listed = {a["name"]: a["task"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert listed == {"intents": "classification", "sentiment": "classification", "ner": "token-classification",
                          "ner_dora": "token-classification"}
