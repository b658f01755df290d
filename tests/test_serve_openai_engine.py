"""The generation engine: rows of different adapters in one batch, KV cache, continuous batching, stops, sampling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import peftkit
from peftkit.serve.engine import Engine, Row, Sampling

from serve_openai_helpers import make_adapter, tiny_causal_lm, tiny_tokenizer

ADAPTERS = ("a", "b", "c")
PROMPTS = ["hello world the cat", "dog", "sky sea tree leaf rain snow wind fire stone", "one two"]
GREEDY = Sampling(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    base = tiny_causal_lm(root / "base")
    adapters = {name: make_adapter(base, root / "adapters" / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}
    adapters["d"] = make_adapter(base, root / "adapters" / "d", seed=9,
                                 config=peftkit.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    return base, adapters


@pytest.fixture(scope="module")
def model(folders):
    from transformers import AutoModelForCausalLM

    base, adapters = folders
    adapted = peftkit.AdaptedModel(AutoModelForCausalLM.from_pretrained(base)).eval()
    for name, folder in adapters.items():
        adapted.load_adapter(folder, name)
    return adapted.eval()


@pytest.fixture
def engine(model):
    engine = Engine(model, tiny_tokenizer())
    yield engine
    engine.close()


def ids(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


def reference(model, adapter: str, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one adapter alone (a batch of one row: the ordinary single-adapter path), every step a
    full forward without a cache."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([tokens]), adapter_names=[adapter]).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def submit_all(engine: Engine, jobs: list[tuple[str, list[int], Sampling]]) -> list[Row]:
    done = [threading.Event() for _ in jobs]
    with engine.wakeup:  # the decoder admits nothing until every job is queued, so they arrive as one batch
        rows = [engine.submit(Row(name, prompt, sampling, lambda e, d=d: d.set() if e[0] != "delta" else None))
                for (name, prompt, sampling), d in zip(jobs, done)]
    for d in done:
        assert d.wait(30)
    return rows


def test_rows_of_different_adapters_in_one_batch_equal_each_adapter_alone_without_a_cache(model, engine):
    steps = []
    engine.on_step = lambda names, prefill: steps.append((tuple(names), prefill))
    jobs = [(name, ids(text), GREEDY) for name in ("base", *ADAPTERS) for text in PROMPTS]
    rows = submit_all(engine, jobs)
    assert steps[0] == (tuple(name for name, _, _ in jobs), True)  # one prefill of all 16 rows, 4 adapters
    assert all(not prefill and len(names) == len(jobs) for names, prefill in steps[1:])
    for (name, prompt, _), row in zip(jobs, rows):
        assert row.tokens == reference(model, name, prompt, GREEDY.max_tokens), name
        assert row.finish_reason == "length"
    alone = {name: reference(model, name, ids(PROMPTS[0]), 12) for name in ("base", *ADAPTERS)}
    assert len({tuple(t) for t in alone.values()}) == 4  # the adapters really change the answer


def test_a_request_arriving_mid_decode_joins_the_batch_and_gets_the_same_tokens_as_alone(model, engine):
    steps = []
    long = Row("a", ids(PROMPTS[2]), Sampling(max_tokens=40, temperature=0), lambda e: None)

    def slow(names, prefill):
        steps.append((tuple(names), prefill, len(long.tokens)))
        time.sleep(0.01)

    engine.on_step = slow
    engine.submit(long)
    while len(long.tokens) < 5:
        time.sleep(0.005)
    late = submit_all(engine, [("b", ids(PROMPTS[0]), GREEDY), ("base", ids(PROMPTS[1]), GREEDY)])
    while long.finish_reason is None:
        time.sleep(0.01)
    joined = [s for s in steps if s[0] == ("b", "base") and s[1]]
    assert joined and 0 < joined[0][2] < 40  # the newcomers were prefilled while the long row was running
    assert any(s[0] == ("a", "b", "base") and not s[1] for s in steps)  # ... then decoded with it in one batch
    assert long.tokens == reference(model, "a", ids(PROMPTS[2]), 40)
    assert late[0].tokens == reference(model, "b", ids(PROMPTS[0]), 12)
    assert late[1].tokens == reference(model, "base", ids(PROMPTS[1]), 12)
    # finished rows left at once: after the short rows ended, the long row decoded alone
    assert steps[-1][0] == ("a",)


def test_an_adapter_that_cannot_be_mixed_waits_for_the_batch_and_is_still_right(model, engine):
    steps = []
    engine.on_step = lambda names, prefill: steps.append(tuple(names))
    jobs = [("a", ids(PROMPTS[0]), GREEDY), ("d", ids(PROMPTS[1]), GREEDY), ("b", ids(PROMPTS[3]), GREEDY)]
    rows = submit_all(engine, jobs)
    assert all("d" not in names or set(names) == {"d"} for names in steps)  # DoRA never shared a batch
    for (name, prompt, _), row in zip(jobs, rows):
        assert row.tokens == reference(model, name, prompt, 12)


def test_the_end_token_and_stop_strings_end_the_answer(model, engine):
    tokenizer = tiny_tokenizer()
    prompt = ids(PROMPTS[0])
    alone = reference(model, "a", prompt, 12)
    full = tokenizer.decode(alone)
    ender = Engine(model, tokenizer, eos_ids=[alone[5]])  # pretend the 6th token is the end token
    try:
        row = ender.generate("a", prompt, GREEDY)
    finally:
        ender.close()
    cut = alone.index(alone[5])
    assert row.tokens == alone[:cut + 1] and row.finish_reason == "stop"
    assert row.text == tokenizer.decode(alone[:cut])

    words = full.split()
    stop = words[6]
    pieces = []
    done = threading.Event()
    row = engine.submit(Row("a", prompt, Sampling(max_tokens=12, temperature=0, stop=["zzz", stop]),
                            lambda e: pieces.append(e[1]) if e[0] == "delta" else done.set()))
    assert done.wait(30)
    assert row.finish_reason == "stop"
    assert row.text == full[:full.index(stop)] and "".join(pieces) == row.text  # nothing of the stop string sent


def test_seeded_sampling_is_reproducible_in_any_batch_and_top_p_near_zero_is_greedy(model, engine):
    prompt = ids(PROMPTS[0])
    sampled = Sampling(max_tokens=12, temperature=1.5, seed=7)
    alone = engine.generate("b", prompt, sampled).tokens
    rows = submit_all(engine, [("a", ids(PROMPTS[2]), GREEDY), ("b", prompt, sampled),
                               ("b", prompt, Sampling(max_tokens=12, temperature=1.5, seed=8)),
                               ("b", prompt, Sampling(max_tokens=12, temperature=1.0, top_p=1e-6, seed=1))])
    assert rows[1].tokens == alone
    assert rows[2].tokens != alone  # another seed, another answer (at this temperature)
    assert rows[3].tokens == reference(model, "b", prompt, 12)


def test_a_cancelled_row_leaves_the_batch_and_an_unloaded_adapter_fails_only_its_rows(engine):
    events = []
    row = engine.submit(Row("a", ids(PROMPTS[0]), Sampling(max_tokens=200, temperature=0), events.append))
    while not row.tokens:
        time.sleep(0.001)
    row.cancel()
    deadline = time.time() + 5
    while engine.active and time.time() < deadline:
        time.sleep(0.005)
    assert engine.active == 0 and len(row.tokens) < 200

    gone = engine.generate("nope", ids(PROMPTS[0]), GREEDY)
    assert gone.tokens == [] and gone.finish_reason is None
