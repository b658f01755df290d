"""Hostile requests against the OpenAI-compatible server: every answer is OpenAI's error shape with a 4xx status,
never a 500 or a traceback, and the server keeps answering correctly (the classification server's standard,
test_serve_hostile.py)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from peftkit.serve.generation import ServedLM
from peftkit.serve.openai_api import create_openai_app

from serve_openai_helpers import make_adapter, running, tiny_causal_lm

CONTEXT = 64
LIMIT = 200_000  # max_request_bytes of this server
MSG = [{"role": "user", "content": "hello cat sat on mat"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_hostile")
    base = tiny_causal_lm(root / "base", context=CONTEXT)
    for i, name in enumerate(("a", "b")):
        make_adapter(base, root / "adapters" / name, seed=i + 1)
    make_adapter(base, root / "adapters" / "spare", seed=7)
    served = ServedLM(base, root / "adapters")
    served.discover()
    served.unload("spare")
    app = create_openai_app(served, max_batch_size=8, max_request_bytes=LIMIT)
    with running(app) as url:
        yield url, served, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def raw(body: str, kind: str = "application/json") -> dict:
    return {"content": body.encode("utf-8", "surrogatepass"), "headers": {"content-type": kind}}


def chat(**fields) -> dict:
    return {"json": {"model": "a", "messages": MSG, "max_tokens": 3, **fields}}


def text(**fields) -> dict:
    return {"json": {"model": "a", "prompt": "one two", "max_tokens": 3, **fields}}


C, T = "/v1/chat/completions", "/v1/completions"
# (what is sent, method, path, request, expected status): the table in the report / README
BATTERY = [
    ("malformed JSON", "post", C, raw('{"model": "a", "messages": ['), 422),
    ("not JSON at all", "post", C, raw("not json"), 422),
    ("empty body", "post", T, raw(""), 422),
    ("JSON null", "post", T, raw("null"), 422),
    ("JSON list", "post", C, raw("[]"), 422),
    ("5,000-digit number", "post", T, raw("1" * 5000), 422),
    ("nesting 50,000 deep", "post", C, raw("[" * 50_000 + "]" * 50_000), 422),
    ("XML content type", "post", C, raw("<a/>", "application/xml"), 422),
    ("model missing", "post", C, {"json": {"messages": MSG}}, 422),
    ("model a number", "post", C, chat(model=5), 422),
    ("model 300 chars", "post", C, chat(model="a" * 300), 422),
    ("model with path characters", "post", C, chat(model="../a"), 404),
    ("model a/../../etc/passwd", "post", T, text(model="a/../../etc/passwd"), 404),
    ("model unknown", "post", T, text(model="nope"), 404),
    ("model a lone surrogate", "post", C, raw('{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}'), 422),
    ("messages missing", "post", C, {"json": {"model": "a"}}, 422),
    ("messages empty", "post", C, chat(messages=[]), 422),
    ("messages a string", "post", C, chat(messages="hello"), 422),
    ("message without content", "post", C, chat(messages=[{"role": "user"}]), 422),
    ("message content null", "post", C, chat(messages=[{"role": "user", "content": None}]), 422),
    ("message content a number", "post", C, chat(messages=[{"role": "user", "content": 5}]), 422),
    ("unknown role", "post", C, chat(messages=[{"role": "wizard", "content": "x"}]), 422),
    ("role tool", "post", C, chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 422),
    ("image content part", "post", C, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 422),
    ("empty message content", "post", C, chat(messages=[{"role": "user", "content": ""}]), 200),
    ("text content parts", "post", C, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "cat"}]}]), 200),
    ("emoji, controls, NUL, RTL", "post", C, chat(messages=[{"role": "user", "content": "🙂\u0000\u0007\u202e\u200b ﷺ"}]), 200),
    ("content a lone surrogate", "post", C, raw('{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}]}'), 422),
    ("prompt a lone surrogate", "post", T, raw('{"model": "a", "prompt": "cat \\udfff"}'), 422),
    ("invalid UTF-8 bytes", "post", T, {"content": b'{"model": "a", "prompt": "\xff\xfe"}',
                                        "headers": {"content-type": "application/json"}}, 422),
    ("prompt missing", "post", T, {"json": {"model": "a"}}, 422),
    ("prompt empty", "post", T, text(prompt=""), 400),
    ("prompt whitespace", "post", T, text(prompt=" \t\n "), 400),
    ("prompt NUL and controls", "post", T, text(prompt="cat\u0000\u0001 dog"), 200),
    ("prompt a list of one string", "post", T, text(prompt=["one two"]), 200),
    ("prompt a list of two strings", "post", T, text(prompt=["one", "two"]), 400),
    ("prompt an empty list", "post", T, text(prompt=[]), 400),
    ("prompt token ids", "post", T, text(prompt=[20, 21, 22]), 200),
    ("prompt a list of one token list", "post", T, text(prompt=[[20, 21]]), 200),
    ("prompt two token lists", "post", T, text(prompt=[[20], [21]]), 400),
    ("prompt a negative token id", "post", T, text(prompt=[20, -1]), 400),
    ("prompt a token id past the vocabulary", "post", T, text(prompt=[10 ** 9]), 400),
    ("prompt float token ids", "post", T, text(prompt=[1.5]), 422),
    ("prompt mixed list", "post", T, text(prompt=["a", 3]), 422),
    ("prompt null", "post", T, text(prompt=None), 422),
    ("prompt longer than the context", "post", T, text(prompt="cat " * CONTEXT), 400),
    ("token prompt longer than the context", "post", T, text(prompt=[20] * CONTEXT), 400),
    ("n = 2", "post", C, chat(n=2), 400),
    ("n = 0", "post", C, chat(n=0), 422),
    ("best_of = 2", "post", T, text(best_of=2), 400),
    ("max_tokens 0", "post", C, chat(max_tokens=0), 422),
    ("max_tokens -5", "post", T, text(max_tokens=-5), 422),
    ("max_tokens 10**12", "post", T, text(max_tokens=10 ** 12), 200),
    ("max_tokens a string", "post", T, text(max_tokens="5"), 422),
    ("max_tokens 2.5", "post", T, text(max_tokens=2.5), 422),
    ("max_tokens true", "post", T, text(max_tokens=True), 422),
    ("max_completion_tokens 0", "post", C, chat(max_completion_tokens=0), 422),
    ("temperature -1", "post", C, chat(temperature=-1), 422),
    ("temperature 2.5", "post", C, chat(temperature=2.5), 422),
    ("temperature NaN", "post", C, raw('{"model": "a", "prompt": "x", "temperature": NaN}'), 422),
    ("temperature Infinity", "post", T, raw('{"model": "a", "prompt": "x", "temperature": Infinity}'), 422),
    ("temperature 1e999", "post", T, raw('{"model": "a", "prompt": "x", "temperature": 1e999}'), 422),
    ("temperature a string", "post", T, text(temperature="hot"), 422),
    ("top_p 0", "post", T, text(top_p=0), 422),
    ("top_p 1.5", "post", T, text(top_p=1.5), 422),
    ("top_p -Infinity", "post", T, raw('{"model": "a", "prompt": "x", "top_p": -Infinity}'), 422),
    ("stop a string", "post", T, text(stop="cat"), 200),
    ("stop a list", "post", T, text(stop=["cat", "dog"]), 200),
    ("stop 5 strings", "post", T, text(stop=list("abcde")), 422),
    ("stop an empty string", "post", T, text(stop=""), 422),
    ("stop a list with an empty string", "post", T, text(stop=["a", ""]), 422),
    ("stop 100,000 characters", "post", T, text(stop="x" * 100_000), 422),
    ("stop a number", "post", T, text(stop=[5]), 422),
    ("stop a lone surrogate", "post", T, raw('{"model": "a", "prompt": "x", "stop": "\\ud800"}'), 422),
    ("seed -1", "post", T, text(seed=-1, temperature=1), 200),
    ("seed 2**64 - 1", "post", T, text(seed=2 ** 64 - 1, temperature=1), 200),
    ("seed 2**70", "post", T, text(seed=2 ** 70), 422),
    ("seed 1.5", "post", T, text(seed=1.5), 422),
    ("stream a string", "post", T, text(stream="yes"), 422),
    ("stream_options without stream", "post", T, text(stream_options={"include_usage": True}), 200),
    ("logprobs true", "post", C, chat(logprobs=True), 400),
    ("logprobs false", "post", C, chat(logprobs=False), 200),
    ("top_logprobs 3", "post", C, chat(top_logprobs=3), 400),
    ("completion logprobs 2", "post", T, text(logprobs=2), 400),
    ("echo", "post", T, text(echo=True), 400),
    ("suffix", "post", T, text(suffix="the end"), 400),
    ("tools", "post", C, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400),
    ("tool_choice auto", "post", C, chat(tool_choice="auto"), 400),
    ("functions", "post", C, chat(functions=[{"name": "f", "parameters": {}}]), 400),
    ("response_format json_object", "post", C, chat(response_format={"type": "json_object"}), 400),
    ("response_format text", "post", C, chat(response_format={"type": "text"}), 200),
    ("logit_bias", "post", C, chat(logit_bias={"20": 100}), 400),
    ("presence_penalty 0.5", "post", C, chat(presence_penalty=0.5), 400),
    ("frequency_penalty 0", "post", C, chat(frequency_penalty=0), 200),
    ("user, metadata, store (ignored)", "post", C, chat(user="u", metadata={"k": "v"}, store=False), 200),
    ("unknown extra field (ignored)", "post", C, chat(wizardry=True), 200),
    ("body over the size limit", "post", T, text(prompt="cat " * LIMIT), 413),
    ("chunked body over the limit", "post", T, {"content": (b"x" * 1024 for _ in range(LIMIT // 1000)),
                                                "headers": {"content-type": "application/json"}}, 413),
    ("GET on a POST endpoint", "get", C, {}, 405),
    ("PUT /v1/completions", "put", T, {"json": {}}, 405),
    ("GET /v1/models/../../etc/passwd", "get", "/v1/models/../../etc/passwd", {}, 404),
    ("DELETE /v1/adapters/%00", "delete", "/v1/adapters/%00", {}, 404),
    ("DELETE /v1/adapters/<5,000 chars>", "delete", "/v1/adapters/" + "a" * 5000, {}, 404),
    ("load adapter outside the folder", "post", "/v1/adapters", {"json": {"name": "x", "path": "../../etc"}}, 400),
    ("load adapter, name a surrogate", "post", "/v1/adapters", raw('{"name": "\\ud800", "path": "a"}'), 422),
]


def settled(engine, seconds: float = 2.0) -> bool:
    """Whether the engine holds no rows within ``seconds`` (a finished row leaves the batch just after its last
    event reached the client)."""
    deadline = time.time() + seconds
    while engine.active and time.time() < deadline:
        time.sleep(0.005)
    return engine.active == 0


def greedy(client, model: str = "b") -> str:
    return client.completions.create(model=model, prompt="red sky", max_tokens=8, temperature=0).choices[0].text


@pytest.mark.parametrize("label,method,path,sent,status", BATTERY, ids=[row[0] for row in BATTERY])
def test_hostile_request_gets_its_status_in_openais_error_shape(server, label, method, path, sent, status):
    response = httpx.request(method, server[0] + path, timeout=30, **sent)
    assert response.status_code == status, (label, response.text[:500])
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text[:300]
        assert error["message"] and "Traceback" not in error["message"] and error["type"] == "invalid_request_error"


def test_the_server_answers_the_same_after_the_battery(server, client):
    before = greedy(client)
    for _, method, path, request, _ in BATTERY:
        assert httpx.request(method, server[0] + path, timeout=30, **request).status_code < 500
    assert greedy(client) == before and settled(server[2].state.engine)


def test_refusals_name_the_problem_and_the_fix(server, client):
    expected = {
        "n": ("n", "one answer per request"), "tools": ("tools", "not supported"),
        "logprobs": ("logprobs", "not supported"), "response_format": ("response_format", "not supported"),
    }
    for field, (param, words) in expected.items():
        value = {"n": 2, "tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": True,
                 "response_format": {"type": "json_object"}}[field]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="a", messages=MSG, max_tokens=2, **{field: value})
        assert err.value.body["param"] == param and words in err.value.body["message"], err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="cat " * CONTEXT)
    assert err.value.body["param"] == "prompt" and f"context is {CONTEXT} tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt=[20, 10 ** 6])
    assert err.value.body["param"] == "prompt" and "vocabulary" in err.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="a", prompt="x", stop="y" * 5000)
    assert "characters" in err.value.body["message"] and err.value.body["param"] == "stop"


def test_token_id_prompts_equal_the_same_text(server, client):
    served = server[1]
    ids = served.tokenizer("red sky")["input_ids"]
    as_ids = client.completions.create(model="b", prompt=ids, max_tokens=8, temperature=0)
    assert as_ids.choices[0].text == greedy(client) and as_ids.usage.prompt_tokens == len(ids)


def test_a_huge_max_tokens_stops_at_the_context_and_usage_adds_up(server, client):
    answer = client.completions.create(model="a", prompt="one two three", max_tokens=10 ** 9, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.total_tokens == CONTEXT == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_non_streaming_client_that_disconnects_frees_its_row(server):
    url, _, app = server
    engine = app.state.engine
    engine.on_step = lambda names, prefill: time.sleep(0.05)  # 60 tokens would take 3 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + T, json={"model": "a", "prompt": "sun", "max_tokens": 60, "temperature": 0}, timeout=0.3)
        started = time.time()
        while engine.active and time.time() - started < 5:
            time.sleep(0.01)
        assert engine.active == 0 and time.time() - started < 1.0
    finally:
        engine.on_step = None


def stream_lines(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        return [line for line in response.iter_lines() if line]


def test_unloading_an_adapter_mid_decode_ends_its_requests_with_a_404_and_spares_the_others(server, client):
    url, served, app = server
    engine = app.state.engine
    assert httpx.post(url + "/v1/adapters", json={"name": "spare", "path": "spare"}).status_code == 201
    alone = greedy(client)
    engine.on_step = lambda names, prefill: time.sleep(0.03)
    try:
        with ThreadPoolExecutor(3) as pool:
            plain = pool.submit(httpx.post, url + T, json={"model": "spare", "prompt": "sun", "max_tokens": 40},
                                timeout=30)
            streamed = pool.submit(stream_lines, url + T, {"model": "spare", "prompt": "sun", "max_tokens": 40,
                                                           "stream": True})
            other = pool.submit(greedy, client)
            deadline = time.time() + 10  # both "spare" rows decode and have streamed a token
            while time.time() < deadline and not (len(spare := [r for r in list(engine.rows) if r.adapter == "spare"])
                                                  == 2 and all(r.sent for r in spare)):
                time.sleep(0.005)
            assert httpx.delete(url + "/v1/adapters/spare").status_code == 200
            response, lines, survivor = plain.result(), streamed.result(), other.result()
    finally:
        engine.on_step = None
    assert response.status_code == 404 and "unloaded" in response.json()["error"]["message"]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] and lines[-1] == "data: [DONE]"  # some tokens came, then the error
    assert events[-1]["error"]["code"] == "model_not_found" and "unloaded" in events[-1]["error"]["message"]
    assert survivor == alone and settled(engine)
    assert greedy(client) == alone


def test_many_concurrent_requests_valid_and_hostile_mixed(server, client):
    alone = {model: greedy(client, model) for model in ("a", "b", "base")}
    jobs = []
    for i in range(48):
        if i % 3 == 2:
            jobs.append(("bad", [text(n=2), text(temperature=9), text(prompt=""), chat(model="zz")][i % 4]))
        else:
            jobs.append((("a", "b", "base")[i % 3], None))

    def run(job):
        model, request = job
        if request is not None:
            return httpx.post(server[0] + (T if "prompt" in request["json"] else C), timeout=60, **request).status_code
        if len(jobs) % 2:
            return greedy(client, model)
        return "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="red sky", max_tokens=8, temperature=0, stream=True))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for (model, request), result in zip(jobs, results):
        if request is None:
            assert result == alone[model]
        else:
            assert result in (400, 404, 422)
    assert settled(server[2].state.engine)


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels): value} of GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_tokens_latencies_batches_and_rows(server, client):
    url, served, app = server
    engine = app.state.engine
    before = scrape(url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert httpx.post(url + T, json={"model": "a", "prompt": "x", "n": 2}).status_code == 400
    assert httpx.get(url + "/no/such/path").status_code == 404
    submitted, original = [], engine.submit
    engine.submit = lambda row: (submitted.append(row), original(row))[1]
    active = []  # the gauge as a scrape sees it during decode steps
    engine.on_step = lambda names, prefill: None if prefill else active.append(
        value(scrape(url), "peftkit_active_rows"))
    try:
        with ThreadPoolExecutor(2) as pool, served.lock:
            # the decoder admits the first request, then waits for the lock: the second one waits in the queue
            first = pool.submit(client.completions.create, model="a", prompt="red sky", max_tokens=6, temperature=0)
            deadline = time.time() + 10
            while not (submitted and not engine.waiting) and time.time() < deadline:
                time.sleep(0.005)
            second = pool.submit(lambda: "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                                 .create(model="b", messages=MSG, max_tokens=5, temperature=0, stream=True)))
            while not engine.waiting and time.time() < deadline:
                time.sleep(0.005)
            during = scrape(url)
        first.result(), second.result()
    finally:
        engine.submit, engine.on_step = original, None
    assert settled(engine) and max(active) == 2
    deadline = time.time() + 2  # a request is counted once its answer is sent: just after the client has it
    answered = [("peftkit_requests_total", {"endpoint": route, "status": "200"}) for route in (C, T)]
    while (after := scrape(url)) and time.time() < deadline and any(
            value(after, name, **labels) == value(before, name, **labels) for name, labels in answered):
        time.sleep(0.01)
    assert value(during, "peftkit_waiting_rows") == 1 and value(after, "peftkit_waiting_rows") == 0
    assert value(after, "peftkit_active_rows") == 0 and value(after, "peftkit_adapters_loaded") == len(served.adapters)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("peftkit_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("peftkit_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("peftkit_requests_total", endpoint="/v1/completions", status="404") == 1
    assert grew("peftkit_requests_total", endpoint="/v1/completions", status="400") == 1
    assert grew("peftkit_requests_total", endpoint="other", status="404") == 1
    assert grew("peftkit_generated_tokens_total", model="a") == 6
    assert grew("peftkit_generated_tokens_total", model="b") == 5
    assert grew("peftkit_time_to_first_token_seconds_count") == 2
    assert grew("peftkit_inter_token_seconds_count") == 5 + 4
    assert grew("peftkit_time_to_first_token_seconds_sum") > 0
    # the second request joined the first's batch: decode steps with 2 rows of 2 different adapters
    assert grew("peftkit_batch_rows_count", phase="prefill") == 2
    assert grew("peftkit_batch_adapters_count", phase="decode") - grew(
        "peftkit_batch_adapters_bucket", phase="decode", le="1.0") >= 1
    assert grew("peftkit_batch_rows_count", phase="decode") - grew(
        "peftkit_batch_rows_bucket", phase="decode", le="1.0") >= 1
