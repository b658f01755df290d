"""Hostile requests and broken adapter folders against a real `peftkit serve`: never a 500, and it keeps serving."""

from __future__ import annotations

import json

import pytest
import torch

from serve_helpers import answer, edit_weights, make_run, run_probabilities, start_server, stop_server
from workflow_helpers import tiny_model_dir

LIMIT = 100_000  # --max_request_bytes of this server


def nan_weights(tensors):
    return {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model_dir = tiny_model_dir(root)
    adapters = root / "adapters"
    make_run(adapters / "intents", model_dir, ["card", "hours", "refund"], seed=1)
    edit_weights(make_run(adapters / "diverged", model_dir, ["x", "y"], seed=2) / "adapter", nan_weights)
    staging = adapters / "staging"
    edit_weights(make_run(staging / "nan", model_dir, ["x", "y"], seed=3) / "adapter", nan_weights)
    edit_weights(make_run(staging / "int8", model_dir, ["x", "y"], seed=4) / "adapter",
                 lambda t: {k: v.to(torch.int8) for k, v in t.items()})
    huge = make_run(staging / "huge_rank", model_dir, ["x", "y"], seed=5) / "adapter" / "adapter_config.json"
    huge.write_text(json.dumps({**json.loads(huge.read_text()), "r": 1_000_000_000}))
    bad_labels = make_run(staging / "bad_labels", model_dir, ["x", "y"], seed=6)
    (bad_labels / "labels.json").write_text('{"labels": [1, 2')
    process, client = start_server(model_dir, adapters, root / "server.log", "--max_request_bytes", str(LIMIT))
    yield {"client": client, "root": root, "adapters": adapters}
    stop_server(process, client)


def test_an_adapter_with_non_finite_weights_is_skipped_at_start_up(server):
    log = (server["root"] / "server.log").read_text()
    assert "skipped adapter folder 'diverged'" in log and "NaN or infinite" in log
    assert [a["name"] for a in server["client"].get("/v1/adapters").json()["adapters"]] == ["intents"]


@pytest.mark.parametrize("path,status,message", [
    ("staging/nan", 400, "NaN or infinite"),
    ("staging/int8", 400, "torch.int8"),
    ("staging/huge_rank", 400, "r=1000000000"),
    ("staging/bad_labels", 400, "cannot be loaded"),
])
def test_broken_adapter_folders_are_refused_on_hot_load(server, path, status, message):
    client = server["client"]
    response = client.post("/v1/adapters", json={"name": "candidate", "path": path})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "candidate" not in {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}


def raw(body: str):
    return {"content": body.encode("utf-8", "surrogatepass"), "headers": {"content-type": "application/json"}}


HOSTILE = [
    ("post", "/v1/classify", raw('{"adapter": "intents", "texts": [')),
    ("post", "/v1/classify", raw("not json at all")),
    ("post", "/v1/classify", raw("")),
    ("post", "/v1/classify", raw("null")),
    ("post", "/v1/classify", raw("[]")),
    ("post", "/v1/classify", raw('"intents"')),
    ("post", "/v1/classify", raw("1" * 5000)),  # more digits than Python parses into an int
    ("post", "/v1/classify", raw('{"adapter": 1e999, "texts": ["a"]}')),
    ("post", "/v1/classify", raw("[" * 50_000 + "]" * 50_000)),  # deeper than the JSON parser recurses
    ("post", "/v1/classify", raw('{"adapter": "intents", "texts": ["\\ud800"]}')),
    ("post", "/v1/classify", raw('{"adapter": "\\udfff", "texts": ["a"]}')),
    ("post", "/v1/classify", raw('{"adapter": "intents", "texts": ["\\u0000"]}')),
    ("post", "/v1/classify", {"content": b'{"adapter": "intents", "texts": ["\xff\xfe"]}',
                              "headers": {"content-type": "application/json"}}),
    ("post", "/v1/classify", {"json": {"adapter": None, "texts": None}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": [None]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": [1, 2.5, True]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": "a string"}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": {"a": "b"}}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": [["nested", ["junk"]]]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": ["a"], "pairs": [["a", "b"]]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "pairs": [["one"]]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "pairs": [["a", "b", "c"]]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "pairs": [[1, 2]]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "pairs": [["a", "b"]]}}),  # a single-text adapter
    ("post", "/v1/classify", {"json": {"adapter": "a" * 100_000, "texts": ["a"]}}),
    ("post", "/v1/classify", {"json": {"adapter": "../intents", "texts": ["a"]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": ["x" * 50_000]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": [" \t\n"]}}),
    ("post", "/v1/classify", {"json": {"adapter": "intents", "texts": ["🙂" * 2000, "\u202e\u200b", "ﷺ" * 500]}}),
    ("post", "/v1/classify", {"content": b"x" * (50 * 1024 * 1024), "headers": {"content-type": "application/json"}}),
    ("post", "/v1/classify", {"content": (b"x" * 1024 for _ in range(200)),  # chunked: no Content-Length
                              "headers": {"content-type": "application/json"}}),
    ("post", "/v1/classify", {"content": b"<a>xml</a>", "headers": {"content-type": "application/xml"}}),
    ("post", "/v1/adapters", {"json": {"name": "a" * 5000, "path": "staging/nan"}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "p" * 3000}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "staging/\u0000"}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "../../../../etc/passwd"}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "/proc/self/root"}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "intents/labels.json"}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "."}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": ""}}),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "~"}}),
    ("post", "/v1/adapters", {"json": {"name": "x.y", "path": "intents"}}),
    ("post", "/v1/adapters", raw('{"name": "x\\ud800", "path": "intents"}')),
    ("post", "/v1/adapters", {"json": {"name": "lora_x", "path": "intents"}}),
    ("post", "/v1/adapters", {"json": {"name": None, "path": None}}),
    ("post", "/v1/adapters", {"json": {"name": ["x"], "path": {"p": 1}}}),
    ("post", "/v1/adapters", raw('{"name": "x", "path": "\\udc80"}')),
    ("delete", "/v1/adapters/" + "a" * 5000, {}),
    ("delete", "/v1/adapters/%00", {}),
    ("delete", "/v1/adapters/..%2F..%2Fetc", {}),
    ("delete", "/v1/adapters/%ED%A0%80", {}),  # the UTF-8 bytes of a surrogate
    ("get", "/v1/adapters/../../etc/passwd", {}),
    ("put", "/v1/classify", {"json": {}}),
]


def test_no_hostile_request_gets_a_500_and_the_server_keeps_answering(server):
    client = server["client"]
    statuses = []
    for method, path, kwargs in HOSTILE:
        response = client.request(method, path, **kwargs)
        statuses.append((method, path[:40], response.status_code))
        assert response.status_code < 500, (method, path[:80], str(kwargs)[:200], response.text[:500])
        if response.status_code >= 400 and path.startswith("/v1/") and method != "get":
            assert response.json().get("error"), response.text[:300]  # a message, not a traceback
    assert {s for _, _, s in statuses} <= {200, 400, 404, 405, 409, 413, 422}
    texts = ["my card was stolen", "refund please"]
    got = answer(client.post("/v1/classify", json={"adapter": "intents", "texts": texts}))
    torch.testing.assert_close(got, run_probabilities(server["adapters"] / "intents", texts), atol=1e-6, rtol=0)
    assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["intents"]


def test_a_request_body_over_the_limit_is_refused_with_413(server):
    client = server["client"]
    big = {"adapter": "intents", "texts": ["word " * 1000] * 30}  # 150 kB: over this server's 100 kB
    response = client.post("/v1/classify", json=big)
    assert response.status_code == 413
    assert "--max_request_bytes" in response.json()["error"]
    assert client.post("/v1/classify", json={"adapter": "intents", "texts": ["word " * 1000] * 10}).status_code == 200
