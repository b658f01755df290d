"""`peftkit serve` started for real on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import os

import pytest
import torch

import peftkit

from serve_helpers import answer, make_run, run_probabilities, start_server, stop_server
from workflow_helpers import tiny_model_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dir(root, dropout=0.1)  # dropout in the base too: the server must switch it off
    adapters = root / "adapters"
    make_run(adapters / "intents", model_dir, ["card", "hours", "refund"], seed=1)
    make_run(adapters / "sentiment", model_dir, ["negative", "neutral", "positive", "very_negative", "very_positive"],
             seed=2, pair_column="hypothesis")
    # loaded last (folders load in name order): were it loaded first, the LoRA adapters would wrap its layers
    # rather than plain Linear layers and take the unfused formula, 1-2 ulp away from `peftkit predict`
    make_run(adapters / "tuned_bias", model_dir, ["a", "b"], seed=3, config=peftkit.BitFitConfig())
    make_run(root / "spare" / "later", model_dir, ["x", "y"], seed=4)
    (adapters / "staging").mkdir()
    make_run(adapters / "staging" / "later", model_dir, ["x", "y"], seed=4)
    other_base = tiny_model_dir(root / "other")
    with torch.no_grad():  # the same architecture with other weights
        from transformers import BertModel

        other = BertModel.from_pretrained(other_base)
        for param in other.parameters():
            param.add_(0.01)
        other.save_pretrained(other_base)
    make_run(adapters / "staging" / "foreign", other_base, ["x", "y"], seed=5)
    os.symlink(root / "spare" / "later", adapters / "escape")
    process, client = start_server(model_dir, adapters, root / "server.log")
    yield {"client": client, "root": root, "adapters": adapters, "model_dir": model_dir, "process": process}
    stop_server(process, client)


def expected_probs(server, name, texts, pairs=None):
    return run_probabilities(server["adapters"] / name, texts, pairs)


def test_classify_matches_the_run_and_lists_adapters(server):
    client = server["client"]
    texts = ["my card was stolen", "when do you open on sunday", "refund please"]
    response = client.post("/v1/classify", json={"adapter": "intents", "texts": texts})
    assert [list(p["probabilities"]) for p in response.json()["predictions"]] == [["card", "hours", "refund"]] * 3
    torch.testing.assert_close(answer(response), expected_probs(server, "intents", texts), atol=1e-6, rtol=0)
    pairs = [["A man sleeps.", "A person rests."], ["It rains.", "The sun shines brightly today."]]
    response = client.post("/v1/classify", json={"adapter": "sentiment", "pairs": pairs})
    expected = expected_probs(server, "sentiment", [a for a, _ in pairs], [b for _, b in pairs])
    torch.testing.assert_close(answer(response), expected, atol=1e-6, rtol=0)
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {"intents", "sentiment", "tuned_bias"}  # 'staging' holds no adapter; 'escape' leads outside
    assert listed["intents"]["labels"] == ["card", "hours", "refund"]
    assert (listed["intents"]["input"], listed["sentiment"]["input"]) == ("texts", "pairs")
    assert client.get("/openapi.json").json()["paths"]["/v1/classify"]
    assert "peftkit_requests_total" in client.get("/metrics").text


def by_length(server, texts: list[str]) -> list[str]:
    """The texts in the order Run.probabilities batches them (by token count), so both see the same batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["model_dir"])
    return sorted(texts, key=lambda t: len(tokenizer(t, truncation=True, max_length=32)["input_ids"]))


def test_answers_are_deterministic_and_equal_predict_bit_for_bit(server):
    """Adapters loaded after the model was put in eval mode used to keep dropout on (answers differed by 0.014)."""
    client = server["client"]
    texts = by_length(server, ["refund my order now please", "card", "when do you open on sunday morning", "hello"])
    first = answer(client.post("/v1/classify", json={"adapter": "intents", "texts": texts}))
    for _ in range(3):
        again = answer(client.post("/v1/classify", json={"adapter": "intents", "texts": texts}))
        assert torch.equal(again, first)
    assert torch.equal(first, expected_probs(server, "intents", texts))  # `peftkit predict`, same batch: same bits
    pairs = [["A man sleeps.", "A person rests."]]
    one = answer(client.post("/v1/classify", json={"adapter": "sentiment", "pairs": pairs}))
    assert torch.equal(one, expected_probs(server, "sentiment", [pairs[0][0]], [pairs[0][1]]))


def test_concurrent_mixed_requests_equal_each_request_sent_alone(server):
    client = server["client"]
    jobs = [("intents", {"texts": ["my card is gone"]}), ("sentiment", {"pairs": [["great service", "they were kind"]]}),
            ("tuned_bias", {"texts": ["hello there", "a much longer text than the others in this batch"]}),
            ("intents", {"texts": ["refund my order"]})] * 6
    alone = {}
    for name, payload in jobs[:4]:  # one after the other: each is alone in its forward pass
        alone[(name, str(payload))] = answer(client.post("/v1/classify", json={"adapter": name, **payload}))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: client.post("/v1/classify", json={"adapter": job[0], **job[1]}), jobs))
    worst = 0.0
    for (name, payload), response in zip(jobs, responses):
        got = answer(response)
        worst = max(worst, float((got - alone[(name, str(payload))]).abs().max()))
    print(f"largest difference between a request in a mixed batch and alone: {worst:.2e}")
    assert worst <= 1e-6


def test_hot_load_and_unload(server):
    client = server["client"]
    response = client.post("/v1/adapters", json={"name": "later", "path": "staging/later"})
    assert response.status_code == 201, response.text
    texts = ["x y z"]
    first = answer(client.post("/v1/classify", json={"adapter": "later", "texts": texts}))
    assert torch.equal(answer(client.post("/v1/classify", json={"adapter": "later", "texts": texts})), first)
    assert torch.equal(first, expected_probs(server, "staging/later", texts))  # hot-loaded: no dropout either
    assert client.post("/v1/adapters", json={"name": "later", "path": "staging/later"}).status_code == 409
    assert client.delete("/v1/adapters/later").status_code == 200
    assert client.post("/v1/classify", json={"adapter": "later", "texts": ["x"]}).status_code == 404
    assert client.delete("/v1/adapters/later").status_code == 404


@pytest.mark.parametrize("request_body,status,message", [
    ('{"adapter": "intents", "texts": [', 422, "invalid request"),
    ({"texts": ["hi"]}, 422, "adapter"),
    ({"adapter": "intents"}, 422, "exactly one of 'texts' or 'pairs'"),
    ({"adapter": "intents", "texts": []}, 422, "empty"),
    ({"adapter": "intents", "texts": ["hi"] * 300}, 413, "limit is 256"),
    ({"adapter": "intents", "texts": ["x" * 20000]}, 413, "characters"),
    ({"adapter": "nope", "texts": ["hi"]}, 404, "no adapter named 'nope'"),
    ({"adapter": "base", "texts": ["hi"]}, 400, "no trained task head"),
    ({"adapter": "intents", "texts": ["fine", "\ud800"]}, 422, "lone surrogate"),
    ({"adapter": "intents", "pairs": [["a", "b"]]}, 422, "trained on single texts"),
    ({"adapter": "sentiment", "texts": ["a"]}, 422, "trained on sentence pairs"),
])
def test_bad_classify_requests(server, request_body, status, message):
    client = server["client"]
    content = request_body if isinstance(request_body, str) else json.dumps(request_body)  # \ud800 escaped
    response = client.post("/v1/classify", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.text
    ok = client.post("/v1/classify", json={"adapter": "intents", "texts": ["my card was stolen"]})
    assert ok.status_code == 200  # still serving correct answers
    torch.testing.assert_close(torch.tensor(list(ok.json()["predictions"][0]["probabilities"].values())),
                               expected_probs(server, "intents", ["my card was stolen"])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("body,status,message", [
    ({"name": "x1", "path": "../spare/later"}, 400, "outside the adapter directory"),
    ({"name": "x2", "path": "escape"}, 400, "outside the adapter directory"),
    ({"name": "x3", "path": "/etc"}, 400, "outside the adapter directory"),
    ({"name": "x4", "path": "staging/missing"}, 404, "no adapter folder"),
    ({"name": "x5", "path": "staging/foreign"}, 409, "another base model"),
    ({"name": "base", "path": "staging/later"}, 400, "collides"),
    ({"name": "n" * 5000, "path": "staging/later"}, 400, "the limit is 100"),
    ({"name": "x6", "path": "p" * 3000}, 400, "cannot be used"),  # ENAMETOOLONG
    ({"name": "x7", "path": "p" * 5000}, 422, "at most 4096 characters"),
])
def test_bad_adapter_loads(server, body, status, message):
    client = server["client"]
    response = client.post("/v1/adapters", json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    assert body["name"] not in {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}


def test_a_bad_text_fails_only_its_own_request(server):
    """A lone surrogate used to pass validation and fail, in the batcher, every request batched with it."""
    client = server["client"]
    bodies = [{"adapter": "intents", "texts": [f"my card {i}"]} for i in range(30)]
    bodies.insert(7, {"adapter": "intents", "texts": ["\ud800"]})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/classify", content=json.dumps(body),
                                                           headers={"content-type": "application/json"}), bodies))
    assert [r.status_code for r in responses].count(200) == 30
    assert responses[7].status_code == 422 and "surrogate" in responses[7].text


def test_a_short_load_run_loses_nothing(server):
    client = server["client"]
    bodies = [lambda i: {"adapter": "intents", "texts": [f"text {i}"]},
              lambda i: {"adapter": "sentiment", "pairs": [[f"text {i}", "yes"]]},
              lambda i: {"adapter": "tuned_bias", "texts": [f"text {i}"]}]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: client.post("/v1/classify", json=bodies[i % 3](i)), range(120)))
    assert [r.status_code for r in responses].count(200) == 120
