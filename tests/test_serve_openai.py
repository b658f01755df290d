"""The OpenAI-compatible server through the official ``openai`` client (uvicorn on a free loopback port)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from peftkit.serve.generation import ServedLM
from peftkit.serve.openai_api import create_openai_app

from serve_openai_helpers import make_adapter, tiny_causal_lm, tiny_tokenizer

CONTEXT = 96


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("openai")
    base = tiny_causal_lm(root / "base", context=CONTEXT)
    for i, name in enumerate(("a", "b", "c", "d")):
        make_adapter(base, root / "adapters" / name, seed=i + 1)
    make_adapter(base, root / "spare" / "e", seed=11)
    served = ServedLM(base, root / "adapters")
    assert served.discover() == []
    app = create_openai_app(served, max_batch_size=16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    yield url, served, app, root
    runner.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def greedy_alone(served, adapter: str, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with served.lock, torch.no_grad():
        for _ in range(steps):
            logits = served.model(input_ids=torch.tensor([tokens]), adapter_names=[adapter]).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


MESSAGES = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello cat sat on mat"}]


def test_models_lists_the_base_and_every_adapter(client):
    assert sorted(m.id for m in client.models.list().data) == ["a", "b", "base", "c", "d"]


def test_chat_answer_is_the_adapters_greedy_tokens_with_usage_and_streams_the_same(server, client):
    _, served, _, _ = server
    tokenizer = tiny_tokenizer()
    prompt = tokenizer(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    for model in ("a", "base"):
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
        expected = tokenizer.decode(greedy_alone(served, model, prompt, 10), skip_special_tokens=True)
        assert answer.object == "chat.completion" and answer.model == model
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 10)
        assert answer.usage.total_tokens == len(prompt) + 10

        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 10 and len({c.id for c in chunks}) == 1
    assert client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0) \
        .choices[0].message.content != client.chat.completions.create(
            model="b", messages=MESSAGES, max_tokens=10, temperature=0).choices[0].message.content


def test_completions_stream_equals_non_streamed_and_stop_strings_cut(client):
    whole = client.completions.create(model="b", prompt="one two three", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="b", prompt="one two three", max_tokens=12, temperature=0, stream=True))
    assert streamed == text
    stop = text.split()[4]
    cut = client.completions.create(model="b", prompt="one two three", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_for_different_adapters_decode_together_and_match_alone(server, client):
    _, _, app, _ = server
    seen = []
    app.state.engine.on_step = lambda names, prefill: seen.append(set(names))
    jobs = [("a", "b", "c", "d", "base")[i % 5] for i in range(10)]

    def ask(model: str, stream: bool) -> str:
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0,
                                               stream=stream)
        return "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content

    try:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(ask, jobs, [i % 2 == 0 for i in range(10)]))
    finally:
        app.state.engine.on_step = None
    alone = {model: ask(model, False) for model in set(jobs)}
    assert answers == [alone[model] for model in jobs]
    assert max(len(names) for names in seen) >= 3  # several adapters shared forward passes


def test_errors_come_in_openais_shape(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found" and "nope" in err.value.body["message"]
    assert "base" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="cat " * CONTEXT, max_tokens=5)
    assert f"context is {CONTEXT} tokens" in err.value.body["message"]
    for bad in ({"model": "a", "messages": []}, {"model": "a", "messages": MESSAGES, "temperature": 5},
                {"model": "a", "messages": [{"role": "wizard", "content": "x"}]},
                {"model": "a", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}):
        with pytest.raises(openai.UnprocessableEntityError) as err:
            client.chat.completions.create(**bad)
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    raw = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 422 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.post(server[0] + "/v1/chat/completions", json={"model": "a"})
    assert raw.status_code == 422 and "messages" in raw.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    url, _, app, _ = server
    engine = app.state.engine
    app.state.engine.on_step = lambda names, prefill: time.sleep(0.02)  # 80 tokens would take 1.6 s
    try:
        body = {"model": "c", "prompt": "sun moon", "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as response:
            first = next(response.iter_lines())
            assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
        started = time.time()
        while engine.active and time.time() - started < 5:
            time.sleep(0.01)
        assert engine.active == 0 and time.time() - started < 1.0
    finally:
        app.state.engine.on_step = None


def test_adapters_load_and_unload_while_serving(server, client):
    url, _, _, root = server
    created = httpx.post(url + "/v1/adapters", json={"name": "e", "path": str(root / "adapters" / ".." / "spare" / "e")})
    assert created.status_code == 400 and "outside" in created.json()["error"]["message"]
    (root / "adapters" / "e").symlink_to(root / "spare" / "e")
    try:
        assert httpx.post(url + "/v1/adapters", json={"name": "e", "path": "e"}).status_code == 400  # a link out
    finally:
        (root / "adapters" / "e").unlink()
    import shutil

    shutil.copytree(root / "spare" / "e", root / "adapters" / "e")
    assert httpx.post(url + "/v1/adapters", json={"name": "e", "path": "e"}).status_code == 201
    assert client.completions.create(model="e", prompt="red", max_tokens=3, temperature=0).usage.completion_tokens == 3
    assert httpx.delete(url + "/v1/adapters/e").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="e", prompt="red", max_tokens=3)
    shutil.rmtree(root / "adapters" / "e")


def test_peftkit_serve_task_causal_lm_starts_the_openai_server_on_run_and_adapter_folders(server, tmp_path):
    import shutil

    import yaml

    from serve_helpers import start_server, stop_server

    _, served, _, root = server
    adapters = tmp_path / "adapters"
    shutil.copytree(root / "adapters" / "a", adapters / "plain")
    run = adapters / "run"  # a run folder of the causal-lm task: config.yaml + adapter/
    shutil.copytree(root / "adapters" / "b", run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "causal-lm", "method": "lora", "model": "x"}))
    other = adapters / "classifier"  # another task's run folder is skipped with a reason
    shutil.copytree(root / "adapters" / "c", other / "adapter")
    (other / "config.yaml").write_text(yaml.safe_dump({"task": "classification", "method": "lora"}))
    process, http = start_server(root / "base", adapters, tmp_path / "log.txt", "--task", "causal-lm")
    try:
        url = str(http.base_url).rstrip("/")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["base", "plain", "run"]
        tokenizer = tiny_tokenizer()
        prompt = tokenizer("red sky")["input_ids"]
        text = client.completions.create(model="run", prompt="red sky", max_tokens=6, temperature=0).choices[0].text
        assert text == tokenizer.decode(greedy_alone(served, "b", prompt, 6), skip_special_tokens=True)
    finally:
        stop_server(process, http)
    assert "skipped adapter folder 'classifier'" in (tmp_path / "log.txt").read_text()


def test_peftkit_serve_context_length_limits_the_prompt(server, tmp_path, capsys):
    from peftkit import cli
    from serve_helpers import start_server, stop_server

    _, _, _, root = server
    (tmp_path / "adapters").mkdir()
    process, http = start_server(root / "base", tmp_path / "adapters", tmp_path / "log.txt", "--task", "causal-lm",
                                 "--context_length", "16", "--default_max_tokens", "4")
    try:
        client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="base", prompt="cat " * 16, max_tokens=2)
        assert "context is 16 tokens" in err.value.body["message"]  # not the model's own CONTEXT
        answer = client.completions.create(model="base", prompt="cat " * 10, max_tokens=50, temperature=0)
        assert answer.usage.completion_tokens == 6 and answer.choices[0].finish_reason == "length"  # 10 + 6 = 16
        assert client.completions.create(model="base", prompt="cat", temperature=0).usage.completion_tokens == 4
        assert {m.model_dump()["default_max_tokens"] for m in client.models.list().data} == {4}
    finally:
        stop_server(process, http)
    for extra, message in ((["--context_length", "16"], "--context_length is for --task causal-lm"),
                           (["--task", "causal-lm", "--context_length", "1"], "at least 2 tokens"),
                           (["--task", "causal-lm", "--max_length", "64"], "limited by --context_length"),
                           (["--task", "causal-lm", "--pooling", "mean"], "--pooling is for classification"),
                           (["--task", "causal-lm", "--max_wait_ms", "2"], "--max_wait_ms is for classification"),
                           (["--default_max_tokens", "5"], "--default_max_tokens is for --task causal-lm"),
                           (["--task", "causal-lm", "--default_max_tokens", "0"], "at least 1")):
        assert cli.main(["serve", "--base", str(root / "base"), "--adapters", str(tmp_path), *extra]) == 2
        assert message in capsys.readouterr().err


def test_models_state_the_limits_and_usage_counts_the_tokens_generated_up_to_a_stop(server, client):
    _, served, _, _ = server
    models = httpx.get(server[0] + "/v1/models").json()["data"]
    assert {(m["context_length"], m["default_max_tokens"]) for m in models} == {(CONTEXT, 256)}
    tokenizer = tiny_tokenizer()
    chat_prompt = tokenizer(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    for kind, prompt in (("chat", chat_prompt), ("text", tokenizer("one two three")["input_ids"])):
        tokens = greedy_alone(served, "c", prompt, 12)
        words = tokenizer.decode(tokens, skip_special_tokens=True).split()
        stop = words[5]
        # the answer ends at the first token whose text holds the stop string; usage counts every token generated
        used = next(k for k in range(1, 13) if stop in tokenizer.decode(tokens[:k], skip_special_tokens=True))
        if kind == "chat":
            answer = client.chat.completions.create(model="c", messages=MESSAGES, max_tokens=12, temperature=0,
                                                    stop=stop)
            got = answer.choices[0].message.content
        else:
            answer = client.completions.create(model="c", prompt="one two three", max_tokens=12, temperature=0,
                                               stop=[stop, "zzz"])
            got = answer.choices[0].text
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        assert got == whole[:whole.index(stop)] and answer.choices[0].finish_reason == "stop"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), used)
        assert answer.usage.total_tokens == len(prompt) + used
    default = client.completions.create(model="c", prompt="one", temperature=0)  # no max_tokens: the default,
    assert default.usage.completion_tokens == CONTEXT - 1  # capped by what the context leaves
