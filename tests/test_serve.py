"""`peftkit serve` started for real on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

import peftkit
from peftkit.heads import build_classifier

from conftest import randomize
from workflow_helpers import tiny_model_dir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def make_run(folder: Path, model_dir: Path, labels: list[str], seed: int, config=None) -> Path:
    """A run folder as `peftkit train` writes it, with a randomised (non-zero) LoRA adapter."""
    torch.manual_seed(seed)
    model = peftkit.adapt(build_classifier(model_dir, len(labels), "mean"),
                          config or peftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(model, seed=seed, scale=0.3)
    folder.mkdir(parents=True)
    model.save_adapter(folder / "adapter")
    (folder / "labels.json").write_text(json.dumps({"labels": labels}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "method": "lora", "pooling": "mean"}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dir(root)
    adapters = root / "adapters"
    make_run(adapters / "intents", model_dir, ["card", "hours", "refund"], seed=1)
    make_run(adapters / "sentiment", model_dir, ["negative", "neutral", "positive", "very_negative", "very_positive"], seed=2)
    make_run(adapters / "bitfit", model_dir, ["a", "b"], seed=3, config=peftkit.BitFitConfig())
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--base", str(model_dir), "--adapters",
                                str(adapters), "--port", str(port), "--max_wait_ms", "20", "--max_length", "32",
                                "--pooling", "mean"],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read())
    yield {"client": client, "root": root, "adapters": adapters, "model_dir": model_dir, "process": process}
    client.close()
    process.terminate()
    process.wait(timeout=10)


def expected_probs(server, name, texts, pairs=None):
    from peftkit.train.run import Run

    run = Run(server["adapters"] / name)
    run.config.max_length = 32
    return run.probabilities(texts, pairs)


def test_classify_matches_the_run_and_lists_adapters(server):
    client = server["client"]
    texts = ["my card was stolen", "when do you open on sunday", "refund please"]
    response = client.post("/v1/classify", json={"adapter": "intents", "texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = expected_probs(server, "intents", texts)
    for prediction, probs in zip(body["predictions"], expected):
        assert list(prediction["probabilities"]) == ["card", "hours", "refund"]
        torch.testing.assert_close(torch.tensor(list(prediction["probabilities"].values())), probs, atol=1e-5, rtol=1e-4)
    pairs = [["A man sleeps.", "A person rests."]]
    body = client.post("/v1/classify", json={"adapter": "sentiment", "pairs": pairs}).json()
    assert len(body["predictions"][0]["probabilities"]) == 5
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {"intents", "sentiment", "bitfit"}  # 'staging' holds no adapter; 'escape' leads outside
    assert listed["intents"]["labels"] == ["card", "hours", "refund"]
    assert client.get("/openapi.json").json()["paths"]["/v1/classify"]
    assert "peftkit_requests_total" in client.get("/metrics").text


def test_concurrent_requests_for_different_adapters_share_a_forward(server):
    client = server["client"]
    jobs = [("intents", ["my card is gone"]), ("sentiment", ["great service"]), ("bitfit", ["hello there"]),
            ("intents", ["refund my order"])] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: client.post("/v1/classify", json={"adapter": job[0], "texts": job[1]}), jobs))
    assert all(r.status_code == 200 for r in responses)
    for (name, texts), response in zip(jobs, responses):
        got = torch.tensor(list(response.json()["predictions"][0]["probabilities"].values()))
        torch.testing.assert_close(got, expected_probs(server, name, texts)[0], atol=1e-5, rtol=1e-4)
    metrics = client.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("peftkit_batch_rows_bucket")]
    single = next(float(l.split()[-1]) for l in sizes if 'le="1.0"' in l)
    total = next(float(l.split()[-1]) for l in sizes if 'le="+Inf"' in l)
    assert single < total  # some forward passes carried several requests


def test_hot_load_and_unload(server):
    client = server["client"]
    response = client.post("/v1/adapters", json={"name": "later", "path": "staging/later"})
    assert response.status_code == 201, response.text
    assert client.post("/v1/classify", json={"adapter": "later", "texts": ["x"]}).status_code == 200
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
])
def test_bad_classify_requests(server, request_body, status, message):
    client = server["client"]
    if isinstance(request_body, str):
        response = client.post("/v1/classify", content=request_body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/classify", json=request_body)
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
])
def test_bad_adapter_loads(server, body, status, message):
    client = server["client"]
    response = client.post("/v1/adapters", json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    assert body["name"] not in {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}


def test_a_short_load_run_loses_nothing(server):
    client = server["client"]
    names = ["intents", "sentiment", "bitfit"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: client.post("/v1/classify", json={"adapter": names[i % 3], "texts": [f"text {i}"]}),
                                  range(120)))
    assert [r.status_code for r in responses].count(200) == 120
