"""Serving many adapters from one base model: mixed-adapter batches next to Hugging Face PEFT, and a load test
of the real HTTP server.

    python benchmarks/serving.py                  # both parts, appended to RESULTS.md (~10 min on 2 cores)
    python benchmarks/serving.py --no-http        # only the mixed-batch forward timings
    python benchmarks/serving.py --quick --no-append

Part 1 (in one process, interleaved rounds, medians): the packaged all-MiniLM-L6-v2 with 64 all-linear r=8
LoRA adapters (random, non-zero B) loaded into both libraries from the same files; a batch of 64 × 64 tokens
whose rows use 1, 8 or 64 different adapters (``adapter_names``), against the base model alone. Before timing,
the two libraries' logits are compared on every mix.

Part 2: ``peftkit serve`` started for real on a free loopback port with 16 adapters (peftkit run folders,
LoRA all-linear r=8 plus their own heads of 2 to 77 labels), then clients at concurrency 1, 8 and 32 send
``POST /v1/classify`` requests (one customer-service message each, a random adapter each) until a fixed number
of requests or a time limit is reached. Every answer is checked against the answer the same request got when
it was sent alone, so an answer mixed up between adapters or rows counts as an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

BATCH, TOKENS, ADAPTERS = 64, 64, 64
MIXES = (1, 8, 64)


def load_base():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=2).eval()


# --------------------------------------------------------------------------------------- mixed batches
def build_models(workdir: Path):
    """peftkit and PEFT models holding the same 64 adapters (written once by peftkit, read by both)."""
    import peft

    import peftkit

    config = peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear")
    ours = peftkit.adapt(load_base(), config, adapter_name="a0")
    for i in range(1, ADAPTERS):
        ours.add_adapter(config, adapter_name=f"a{i}")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    for i in range(ADAPTERS):
        ours.save_adapter(workdir, adapter_name=f"a{i}")  # PEFT layout: workdir/a{i}
    theirs = peft.PeftModel.from_pretrained(load_base(), str(workdir / "a0"), adapter_name="a0")
    for i in range(1, ADAPTERS):
        theirs.load_adapter(str(workdir / f"a{i}"), adapter_name=f"a{i}")
    ours.set_adapter("a0")
    theirs.set_adapter("a0")
    return ours.eval(), theirs.eval()


def mixed_batch_part(repeats: int) -> tuple[str, str]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (BATCH, TOKENS), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = load_base()
    with tempfile.TemporaryDirectory(prefix="peftkit-serving-") as workdir:
        ours, theirs = build_models(Path(workdir))

    worst = 0.0
    with torch.inference_mode():
        reference = base(**inputs).logits
        for mix in MIXES:
            names = [f"a{i % mix}" for i in range(BATCH)]
            a, b = ours(**inputs, adapter_names=names).logits, theirs(**inputs, adapter_names=names).logits
            worst = max(worst, (a - b).abs().max().item())
            if (a - reference).abs().max().item() < 1e-4:
                raise SystemExit("the adapters do not change the output: the comparison would be empty")
    if worst > 1e-4:
        raise SystemExit(f"peftkit and PEFT disagree on mixed batches by {worst:.2e}")

    def runner(model, names=None):
        def run() -> None:
            with torch.inference_mode():
                model(**inputs) if names is None else model(**inputs, adapter_names=names)
        return run

    workloads = {"base": runner(base), "peft one adapter (active)": runner(theirs),
                 "peftkit one adapter (active)": runner(ours)}
    for mix in MIXES:
        names = [f"a{i % mix}" for i in range(BATCH)]
        workloads[f"peft adapter_names, {mix}"] = runner(theirs, names)
        workloads[f"peftkit adapter_names, {mix}"] = runner(ours, names)
    times = common.interleaved(workloads, repeats=repeats, warmup=1)
    base_time = common.median(times["base"])
    rows = [["base model alone", "", f"{base_time * 1000:.0f} ms", "", "1.00×", ""]]
    labels = [("one adapter, set active (no adapter_names)", "one adapter (active)")]
    labels += [(f"{mix} adapter{'s' if mix > 1 else ''} mixed in the batch (adapter_names)", f"adapter_names, {mix}") for mix in MIXES]
    for label, key in labels:
        p, k = common.median(times[f"peft {key}"]), common.median(times[f"peftkit {key}"])
        rows.append([label, f"{p * 1000:.0f} ms", f"{k * 1000:.0f} ms", f"{k / p:.2f}×", f"{k / base_time:.2f}×",
                     f"{p / base_time:.2f}×"])
    table = common.markdown_table([f"inference B{BATCH}×T{TOKENS}, LoRA all-linear r=8", "PEFT", "peftkit",
                                   "peftkit / PEFT", "peftkit / base", "PEFT / base"], rows)
    notes = (f"Medians of {repeats} interleaved rounds. peftkit and PEFT logits agree on every mix to {worst:.1e} "
             f"(max abs). {ADAPTERS} adapters loaded in both models; row i uses adapter i mod N.")
    return table, notes


# ------------------------------------------------------------------------------------------ HTTP load
def write_adapters(root: Path, count: int) -> list[str]:
    import yaml

    import peftkit
    from peftkit.tasks.heads import build_classifier

    sizes = [2, 3, 5, 77]
    names = []
    for i in range(count):
        labels = [f"label_{j}" for j in range(sizes[i % len(sizes)])]
        torch.manual_seed(100 + i)
        model = peftkit.adapt(build_classifier(common.minilm_path(), len(labels), "auto"),
                              peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = root / f"task{i:02d}"
        folder.mkdir(parents=True)
        model.save_adapter(folder / "adapter")
        (folder / "labels.json").write_text(json.dumps({"labels": labels}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": "minilm", "method": "lora", "pooling": "auto"}))
        names.append(folder.name)
    return names


def demo_texts() -> list[str]:
    from importlib.resources import files

    with files("peftkit.tasks.demo").joinpath("intents_test.csv").open(encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def start_server(adapters: Path, max_batch_size: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--base", "minilm", "--adapters", str(adapters),
                                "--port", str(port), "--max_batch_size", str(max_batch_size), "--max_wait_ms",
                                str(max_wait_ms), "--max_length", "64"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{process.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not come up within 300 s")


def load_level(url: str, jobs: list[tuple[str, str]], concurrency: int, expected: dict | None, time_limit: float) -> dict:
    """Send ``jobs`` with ``concurrency`` clients (each its own connection); stop early at the time limit."""
    import httpx

    lock = threading.Lock()
    queue = list(reversed(jobs))
    latencies, errors, answers, sent = [], [], {}, [0]
    start = time.perf_counter()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    if not queue or time.perf_counter() - start > time_limit:
                        return
                    adapter, text = queue.pop()
                    sent[0] += 1
                began = time.perf_counter()
                try:
                    response = client.post("/v1/classify", json={"adapter": adapter, "texts": [text]})
                    took = time.perf_counter() - began
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    result = response.json()["predictions"][0]
                    if expected is not None:
                        want = expected[(adapter, text)]
                        gap = max(abs(a - b) for a, b in zip(result["probabilities"].values(), want["probabilities"].values()))
                        if gap > 1e-3:  # (the label alone could flip on a tie)
                            raise RuntimeError(f"answer differs from the request sent alone ({adapter}, gap {gap:.1e})")
                    with lock:
                        latencies.append(took)
                        answers[(adapter, text)] = result
                except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the load
                    with lock:
                        errors.append(str(err))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"concurrency": concurrency, "sent": sent[0], "ok": len(latencies), "errors": len(errors),
            "lost": sent[0] - len(latencies) - len(errors), "seconds": seconds, "throughput": len(latencies) / seconds,
            "p50": pct(0.50), "p99": pct(0.99), "answers": answers, "first_errors": errors[:3]}


def batch_rows(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("peftkit_batch_rows_sum", "peftkit_batch_rows_count")):
            key, value = line.split()[0], float(line.split()[-1])
            values[key] = value
    return values.get("peftkit_batch_rows_sum", 0.0), values.get("peftkit_batch_rows_count", 0.0)


def http_part(levels: list[tuple[int, int]], adapters_count: int, time_limit: float) -> tuple[str, str]:
    texts = demo_texts()
    with tempfile.TemporaryDirectory(prefix="peftkit-serve-") as workdir:
        names = write_adapters(Path(workdir) / "adapters", adapters_count)
        process, url = start_server(Path(workdir) / "adapters", max_batch_size=32, max_wait_ms=5)
        try:
            rng = random.Random(0)
            pool = [(rng.choice(names), rng.choice(texts)) for _ in range(max(n for _, n in levels))]
            # The answers each request gets alone (concurrency 1) are the reference for the concurrent levels.
            alone = load_level(url, list(dict.fromkeys(pool)), 1, None, time_limit=10 * time_limit)
            if alone["errors"]:
                raise SystemExit(f"requests sent alone failed: {alone['first_errors']}")
            expected = alone["answers"]
            rows, measured = [], []
            for concurrency, count in levels:
                before = batch_rows(url)
                result = load_level(url, pool[:count], concurrency, expected, time_limit)
                after = batch_rows(url)
                forwards = after[1] - before[1]
                mean_rows = (after[0] - before[0]) / forwards if forwards else float("nan")
                measured.append(result)
                rows.append([str(concurrency), str(result["sent"]), str(result["ok"]), str(result["errors"]),
                             str(result["lost"]), f"{result['throughput']:.1f}", f"{result['p50']:.0f}",
                             f"{result['p99']:.0f}", f"{mean_rows:.1f}"])
                print(f"concurrency {concurrency}: {result['ok']}/{result['sent']} ok, {result['errors']} errors, "
                      f"{result['throughput']:.1f} req/s, p50 {result['p50']:.0f} ms, p99 {result['p99']:.0f} ms, "
                      f"{mean_rows:.1f} rows/forward {result['first_errors']}", flush=True)
            alive = process.poll() is None
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    table = common.markdown_table(["concurrency", "requests sent", "answered OK", "errors", "lost", "requests/s",
                                   "p50 ms", "p99 ms", "mean rows per forward"], rows)
    notes = (f"`peftkit serve --base minilm` with {adapters_count} LoRA all-linear r=8 adapters (heads of 2, 3, 5 and 77 "
             f"labels), --max_batch_size 32 --max_wait_ms 5 --max_length 64; one message from the demo test set per "
             f"request, a random adapter each; each level stops after its request count or {time_limit:.0f} s. Clients "
             f"run in the same 2-core machine as the server. Every answer matched the same request sent alone "
             f"(label, probabilities to 1e-3) or it is counted as an error. Server still up after the run: {alive}.")
    return table, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--no-mixed", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from peftkit.ops.memory import keep_freed_memory

    keep_freed_memory()  # as `peftkit serve` does; the same for every workload of this process
    parts = []
    if not args.no_mixed:
        table, notes = mixed_batch_part(3 if args.quick else args.repeats)
        print(table + "\n\n" + notes, flush=True)
        parts.append((table, notes))
    if not args.no_http:
        levels = [(1, 30), (8, 120), (32, 240)] if args.quick else [(1, 150), (8, 600), (32, 1200)]
        table, notes = http_part(levels, adapters_count=16, time_limit=60 if args.quick else 180)
        print(table + "\n\n" + notes, flush=True)
        parts.append((table, notes))
    if not args.no_append and parts:
        common.append_results("Serving: mixed-adapter batches and the HTTP server",
                              "\n\n".join(t for t, _ in parts), "\n\n".join(n for _, n in parts))


if __name__ == "__main__":
    main()
