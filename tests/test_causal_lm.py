"""task: causal-lm on a tiny LLaMA with a tokenizer built in the test: data formats and their errors, the label
mask, truncation, refusals, training through the CLI, generate / chat, and merge (greedy tokens equal)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from causal_helpers import chat_rows, tiny_chat_model, tiny_tokenizer, write_jsonl
from peftkit.tasks import causal_lm_data as C
from peftkit.tasks.data import DataError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)


# ----------------------------------------------------------------------------------------- label mask
MULTI = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
         {"role": "assistant", "content": "hi, how can I help"}, {"role": "user", "content": "cancel my order"},
         {"role": "assistant", "content": "yes, cancelled"}]


def _runs(feature: dict) -> list[list[int]]:
    """Consecutive runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != C.IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("messages", [MULTI, MULTI[1:3]], ids=["multi-turn", "single-turn"])
def test_label_mask_is_exactly_the_assistant_turns(messages):
    tokenizer = tiny_tokenizer()
    feature = C.encode_conversation(tokenizer, messages, 512)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # each labelled run decodes to one answer plus its end-of-turn token, in order, and nothing else is labelled
    assert [tokenizer.decode(run) for run in _runs(feature)] == [f"{a}<|im_end|>" for a in answers]
    unlabelled = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label == C.IGNORE]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = full
    for answer in answers:
        expected = expected.replace(f"{answer}<|im_end|>", "", 1)
    assert tokenizer.decode(unlabelled) == expected
    assert tokenizer.decode(feature["input_ids"]) == full


def test_truncation_is_counted_and_reported(capsys):
    from peftkit.tasks import get_task

    tokenizer = tiny_tokenizer()
    long = C.Conversation(tuple(MULTI), 1)
    short = C.Conversation(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}), 2)
    full = len(C.encode_conversation(tokenizer, MULTI, 512)["input_ids"])
    features = get_task("causal-lm").encode(tokenizer, [long, short], 20)
    assert [len(f["input_ids"]) for f in features] == [20, len(C.encode_conversation(tokenizer, short.messages, 512)["input_ids"])]
    assert features[0]["cut"] == full - 20 and features[1]["cut"] == 0
    message = capsys.readouterr().err
    assert f"1 of 2 conversations are longer than max_length=20" in message and f"({full - 20} tokens" in message


# ------------------------------------------------------------------------------------------------ data
def _columns(**kw) -> C.Columns:
    return C.Columns(**kw)


def test_every_format_reads_to_the_same_conversation(tmp_path):
    want = ({"role": "user", "content": "cancel my order"}, {"role": "assistant", "content": "done"})
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": list(want)}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "cancel my order", "completion": "done"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "cancel my order", "input": "", "output": "done"}])
    csv_file = tmp_path / "data.csv"
    csv_file.write_text('question,answer\n"cancel my order","done"\n', encoding="utf-8")
    tsv_file = tmp_path / "data.tsv"
    tsv_file.write_text("prompt\tcompletion\ncancel my order\tdone\n", encoding="utf-8")
    for path, columns in [(chat, _columns()), (pc, _columns()), (alpaca, _columns()), (tsv_file, _columns()),
                          (csv_file, _columns(prompt="question", completion="answer"))]:
        assert C.read_conversations(path, columns)[0].messages == want, path
    with_input = write_jsonl(tmp_path / "a2.jsonl", [{"instruction": "translate", "input": "hola", "output": "hello"}])
    assert C.read_conversations(with_input, _columns())[0].messages[0]["content"] == "translate\n\nhola"
    system = C.read_conversations(pc, _columns(system="be brief"))[0].messages
    assert system[0] == {"role": "system", "content": "be brief"} and system[1:] == want


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi"}, "line 2: no field 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "line 2, message 2: empty assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "line 2, message 1: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: the conversation must end with an assistant turn"),
    ({"text": "hi", "label": "x"}, "line 2: no 'messages', no 'prompt'/'completion'"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError) as err:
        C.read_conversations(path, _columns())
    assert str(err.value).startswith(f"{path}, ") and message in str(err.value)


def test_a_tokenizer_without_chat_template_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        C.check_template(tokenizer)


# ----------------------------------------------------------------------------------- model and refusals
@pytest.mark.parametrize("tie", [True, False])
def test_all_linear_never_targets_lm_head(tmp_path, tie):
    from peftkit import LoraConfig, adapt
    from peftkit.tasks import get_task

    folder = tiny_chat_model(tmp_path / "m", tie=tie)
    model = get_task("causal-lm").build_model(str(folder), None, None)
    assert type(model).__name__ == "LlamaForCausalLM"
    adapted = adapt(model, LoraConfig(r=2, target_modules="all-linear"))
    targeted = adapted.targeted_modules()
    assert len(targeted) == 2 * 7 and not any("lm_head" in t for t in targeted)
    assert {t.rsplit(".", 1)[1] for t in targeted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}


def test_method_head_is_refused_with_a_message(tmp_path):
    folder = tiny_chat_model(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    done = cli("train", "--model", str(folder), "--task", "causal-lm", "--method", "head", "--train_file", str(data),
               "--output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "method: 'head'" in done.stderr and "causal LM gets no new head" in done.stderr
    assert not (tmp_path / "run").exists()


def test_metric_for_best_model_defaults_to_loss_and_refuses_accuracy():
    from peftkit.config import ConfigError
    from peftkit.train.config import validate

    assert validate({"task": "causal-lm"}).metric_for_best_model == "loss"
    assert validate({}).metric_for_best_model == "accuracy"  # classification keeps its default
    with pytest.raises(ConfigError, match="task 'causal-lm' reports loss, not 'accuracy'"):
        validate({"task": "causal-lm", "metric_for_best_model": "accuracy"})


# ------------------------------------------------------------------------------ training, generation, merge
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run of the tiny chat model through the CLI (learning rate high enough to move greedy answers)."""
    root = tmp_path_factory.mktemp("causal")
    folder = tiny_chat_model(root / "tiny")
    write_jsonl(root / "train.jsonl", chat_rows(30))
    done = cli("train", "--model", str(folder), "--task", "causal-lm", "--train_file", "train.jsonl",
               "--output_dir", "run", "--max_steps", "30", "--batch_size", "8", "--learning_rate", "2e-2",
               "--eval_strategy", "steps", "--eval_steps", "10", "--quiet", "true", "--max_new_tokens", "4",
               "--eval_generations", "3", "--seed", "1", cwd=root)
    assert done.returncode == 0, done.stderr
    return root, done


@pytest.mark.parametrize("method,lr", [("dora", "2e-2"), ("adalora", "2e-2"), ("bottleneck", "1e-2"),
                                       ("bitfit", "5e-2"), ("full", "2e-3")])
def test_every_decoder_method_trains_through_the_cli(tmp_path, method, lr):
    """Each method lowers the dev loss below the base model's (the task's chunked loss, full fine-tuning's trainable
    tied head included); BitFit is refused with a reason on LLaMA, which has no biases."""
    folder = tiny_chat_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "train.jsonl", chat_rows(30))
    done = cli("train", "--model", str(folder), "--task", "causal-lm", "--method", method, "--train_file",
               "train.jsonl", "--output_dir", "run", "--max_steps", "12", "--batch_size", "8", "--learning_rate", lr,
               "--eval_strategy", "no", "--quiet", "true", "--eval_generations", "0", "--seed", "1", cwd=tmp_path)
    if method == "bitfit":
        assert done.returncode == 2 and "no Linear/LayerNorm/Conv biases for BitFit" in done.stderr
        assert "Traceback" not in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert "using the plain" not in done.stderr  # the chunked loss was used
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dev"]["loss"] < report["base_dev"]["loss"], (method, report["dev"], report["base_dev"])


def test_training_reports_dev_loss_perplexity_and_generation(trained):
    root, done = trained
    report = json.loads((root / "run" / "report.json").read_text())
    dev = report["dev"]
    assert dev["perplexity"] == pytest.approx(torch.tensor(dev["loss"]).exp().item(), rel=1e-6)
    losses = [h["dev_loss"] for h in report["history"] if "dev_loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all("dev_perplexity" in h for h in report["history"] if "dev_loss" in h)
    assert report["metric_for_best_model"] == "loss"
    base = report["base_dev"]  # the "before": the base model (adapters off) on the same dev conversations
    assert base["tokens"] == dev["tokens"] and base["loss"] > dev["loss"]
    assert base["perplexity"] == pytest.approx(torch.tensor(base["loss"]).exp().item(), rel=1e-6)
    assert f"base model on dev: loss {base['loss']:.4f}" in done.stdout
    generation = report["generation"]
    assert generation["samples"] == 3 and len(generation["examples"]) == 3
    for side in ("base", "adapted"):
        assert set(generation[side]) == {"exact_match", "rougeL", "bleu"}
    assert "generation on 3 dev prompts" in done.stdout and "adapted:" in done.stdout
    assert (root / "run" / "adapter" / "adapter_config.json").is_file()
    stored = json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())
    assert stored["task_type"] == "CAUSAL_LM"


def test_info_of_a_causal_lm_run_shows_its_results_and_no_labels_line(trained):
    root, _ = trained
    done = cli("info", "run", cwd=root)
    assert done.returncode == 0, done.stderr
    keys = [line.split(":", 1)[0].strip() for line in done.stdout.splitlines()]
    assert "labels" not in keys
    assert {"task", "method", "max_length", "dev loss", "dev perplexity", "base dev loss", "base dev perplexity",
            "rougeL (base -> adapted)"} <= set(keys)


def _greedy(model, tokenizer, prompt: str, n: int = 6) -> list[int]:
    from peftkit.tasks.causal_lm_generate import Sampling, generate

    return generate(model, tokenizer, [[{"role": "user", "content": prompt}]], Sampling(max_new_tokens=n), 128)[0]["tokens"]


def test_merged_folder_generates_the_same_greedy_tokens(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.train.run import Run

    root, _ = trained
    run = Run(root / "run")
    prompts = ["hello there", "cancel my order please", "what is the refund policy", "one two three"]
    unmerged = [_greedy(run.model, run.tokenizer, p) for p in prompts]
    base = AutoModelForCausalLM.from_pretrained(root / "tiny").eval()
    assert unmerged != [_greedy(base, run.tokenizer, p) for p in prompts]  # the adapter changed the answers
    done = cli("merge", "--run", "run", "--out", "merged", cwd=root)
    assert done.returncode == 0, done.stderr
    plain = AutoModelForCausalLM.from_pretrained(root / "merged").eval()  # plain transformers, no peftkit
    tokenizer = AutoTokenizer.from_pretrained(root / "merged")
    assert [_greedy(plain, tokenizer, p) for p in prompts] == unmerged
    merged_run = cli("generate", "--run", "merged", "--prompt", "hello there", "--max_new_tokens", "6", cwd=root)
    adapter_run = cli("generate", "--run", "run", "--prompt", "hello there", "--max_new_tokens", "6", cwd=root)
    assert merged_run.returncode == adapter_run.returncode == 0 and merged_run.stdout == adapter_run.stdout


def test_generate_prompt_and_data_file(trained):
    from peftkit.train.run import Run

    root, _ = trained
    run = Run(root / "run")
    expected = run.tokenizer.decode(_greedy(run.model, run.tokenizer, "hello there", 5), skip_special_tokens=True)
    done = cli("generate", "--run", "run", "--prompt", "hello there", "--max_new_tokens", "5", cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == expected.strip()
    done = cli("generate", "--run", "run", "--data", "train.jsonl", "--out", "answers.jsonl", "--max_new_tokens", "5",
               cwd=root)
    assert done.returncode == 0 and "30 answers written" in done.stdout
    rows = [json.loads(line) for line in (root / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[2] == {"prompt": "hello there", "completion": expected.strip(),
                                           "finish_reason": rows[2]["finish_reason"]}
    sampled = [cli("generate", "--run", "run", "--prompt", "hello", "--temperature", "1.5", "--seed", "3",
                   "--max_new_tokens", "8", cwd=root).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded sampling repeats
    bad = cli("generate", "--run", "run", "--prompt", "x", "--top_p", "0", cwd=root)
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr


def test_stop_strings_cut_the_answer(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.tasks.causal_lm_generate import Sampling, generate

    root, _ = trained  # the untrained base: long random answers
    model, tokenizer = AutoModelForCausalLM.from_pretrained(root / "tiny"), AutoTokenizer.from_pretrained(root / "tiny")
    prompt = [[{"role": "user", "content": "one two"}]]
    free = generate(model, tokenizer, prompt, Sampling(max_new_tokens=12, temperature=1.0, seed=0), 128)[0]
    stop = "day"  # a word that seed 0 samples mid-answer (same draws again below, up to the stop)
    assert stop in free["text"] and not free["text"].strip().endswith(stop) and free["finish_reason"] == "length"
    cut = generate(model, tokenizer, prompt, Sampling(max_new_tokens=12, temperature=1.0, seed=0, stop=(stop,)), 128)[0]
    assert len(cut["tokens"]) < len(free["tokens"])  # generation itself stopped there
    assert cut["text"] == free["text"][:free["text"].index(stop)].strip() and cut["finish_reason"] == "stop"


def test_chat_streams_answers_from_stdin(trained):
    from peftkit.train.generate import chat, open_causal

    root, _ = trained
    run = open_causal(str(root / "run"))
    from peftkit.tasks.causal_lm_generate import Sampling, generate

    first = generate(run.model, run.tokenizer, [[{"role": "user", "content": "hello there"}]], Sampling(max_new_tokens=5), 128)[0]
    out = io.StringIO()
    turns = chat(run, Sampling(max_new_tokens=5), io.StringIO("hello there\n/reset\nhello there\n/exit\n"), out)
    assert turns == 2
    lines = out.getvalue().splitlines()
    assert lines[1].strip() == first["text"] and lines[3].strip() == first["text"]  # /reset: the same first turn
    done = cli("chat", "--run", "run", "--max_new_tokens", "5", cwd=root, stdin="hello there\n")
    assert done.returncode == 0 and first["text"] in done.stdout


def test_generate_refuses_a_classification_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: classification\n")
    (tmp_path / "run" / "labels.json").write_text('{"labels": ["a", "b"]}')
    done = cli("generate", "--run", "run", "--prompt", "x", cwd=tmp_path)
    assert done.returncode == 2 and "need a run of task causal-lm" in done.stderr


def test_peft_loads_the_adapter_and_generates_the_same_greedy_tokens(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.train.run import Run

    root, _ = trained
    run = Run(root / "run")
    prompts = ["hello there", "cancel my order please"]
    ours = [_greedy(run.model, run.tokenizer, p) for p in prompts]
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "tiny"), root / "run" / "adapter").eval()
    assert [_greedy(theirs.base_model.model, run.tokenizer, p) for p in prompts] == ours
