"""The server's batching in-process (FastAPI TestClient): what shares a forward pass, and how failures stay apart."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import peftkit

from serve_helpers import make_run
from workflow_helpers import tiny_model_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from peftkit.serve.model import ServedModel

    root = tmp_path_factory.mktemp("batching")
    model_dir = tiny_model_dir(root, dropout=0.1)
    adapters = root / "adapters"
    make_run(adapters / "intents", model_dir, ["card", "hours", "refund"], seed=1)
    make_run(adapters / "sentiment", model_dir, ["neg", "pos"], seed=2)
    make_run(adapters / "tuned_bias", model_dir, ["a", "b"], seed=3, config=peftkit.BitFitConfig())
    model = ServedModel(model_dir, adapters, pooling="mean", max_length=32)
    assert model.discover() == []
    return model


def client_for(served, rows_per_forward: int):
    """A client of an app whose batcher waits (up to 10 s) until exactly ``rows_per_forward`` rows are there."""
    from fastapi.testclient import TestClient

    from peftkit.serve.app import create_app

    return TestClient(create_app(served, max_batch_size=rows_per_forward, max_wait_ms=10_000))


def record_forwards(served, monkeypatch) -> list[list[str]]:
    forwards: list[list[str]] = []
    original = served._forward

    def recording(features, names):
        forwards.append(list(names))
        return original(features, names)

    monkeypatch.setattr(served, "_forward", recording)
    return forwards


def post_all(client, bodies: list[dict]) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post("/v1/classify", json=body), bodies))


def test_requests_for_different_adapters_share_one_forward(served, monkeypatch):
    bodies = [{"adapter": "intents", "texts": ["my card is gone"]}, {"adapter": "sentiment", "texts": ["great service"]},
              {"adapter": "tuned_bias", "texts": ["hello there"]}, {"adapter": "intents", "texts": ["refund my order"]}]
    alone = [torch.stack(served.infer([(b["adapter"], b["texts"][0], None)])) for b in bodies]
    forwards = record_forwards(served, monkeypatch)
    with client_for(served, rows_per_forward=len(bodies)) as client:
        responses = post_all(client, bodies)
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * 4
    assert len(forwards) == 1 and sorted(forwards[0]) == sorted(b["adapter"] for b in bodies)  # four requests, one pass
    for response, expected in zip(responses, alone):
        got = torch.tensor(list(response.json()["predictions"][0]["probabilities"].values()))
        torch.testing.assert_close(got, expected[0], atol=1e-6, rtol=0)
    assert 'peftkit_batch_adapters_bucket{le="2.0"} 0.0' in metrics  # the one forward held 3 adapters
    assert 'peftkit_batch_adapters_bucket{le="4.0"} 1.0' in metrics


class PickyTokenizer:
    """The server's tokenizer, failing on one word (as a fast tokenizer fails on text it cannot take)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, texts, *args, **kwargs):
        if any("explode" in t for t in texts):
            raise ValueError("the tokenizer cannot take this text")
        return self.inner(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_row_that_cannot_be_tokenized_fails_only_its_request(served, monkeypatch):
    monkeypatch.setattr(served, "tokenizer", PickyTokenizer(served.tokenizer))
    bodies = [{"adapter": "intents", "texts": [f"my card {i}"]} for i in range(5)]
    bodies.insert(2, {"adapter": "sentiment", "texts": ["this will explode"]})
    forwards = record_forwards(served, monkeypatch)
    with client_for(served, rows_per_forward=len(bodies)) as client:
        responses = post_all(client, bodies)
    assert [r.status_code for r in responses] == [200, 200, 422, 200, 200, 200]
    assert "cannot be tokenized" in responses[2].json()["error"]
    assert len(forwards) == 1 and len(forwards[0]) == 5  # the other rows still shared one forward


def test_a_row_whose_forward_fails_fails_only_its_request(served, monkeypatch):
    """A batched forward that fails is retried row by row; only the request holding the guilty row fails."""
    poison = served.tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    embedding = next(m for m in served.model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings > 1000)

    def refuse(module, args):
        if bool((args[0] == poison).any()):
            raise RuntimeError("this row breaks the forward")

    bodies = [{"adapter": "intents", "texts": ["my card is gone", "refund please"]},
              {"adapter": "sentiment", "texts": ["a zebra"]}, {"adapter": "tuned_bias", "texts": ["hello"]}]
    alone = {b["adapter"]: torch.stack(served.infer([(b["adapter"], t, None) for t in b["texts"]])) for b in bodies}
    handle = embedding.register_forward_pre_hook(refuse)
    try:
        with client_for(served, rows_per_forward=4) as client:
            responses = post_all(client, bodies)
            assert client.post("/v1/classify", json=bodies[0]).status_code == 200  # and it keeps serving
    finally:
        handle.remove()
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert "RuntimeError" in responses[1].json()["error"]
    for body, response in zip(bodies, responses):
        if response.status_code == 200:
            got = torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]])
            torch.testing.assert_close(got, alone[body["adapter"]], atol=1e-6, rtol=0)
