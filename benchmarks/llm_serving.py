"""A load test of the OpenAI-compatible generation server (``peftkit serve --task causal-lm``) on SmolLM2 with the
official ``openai`` client.

    python benchmarks/llm_serving.py                    # full run (~10 min on 2 idle cores), appends to RESULTS.md
    python benchmarks/llm_serving.py --quick --no-append

The script writes a few LoRA all-linear r=16 adapters (random non-zero B, saved with peftkit) into a temporary
folder, starts ``peftkit serve --task causal-lm --base smollm2`` on it (a subprocess, a free loopback port), and
first sends every distinct request once, alone and not streamed: those greedy answers are the reference. Then
clients at concurrency 1, 8 and 16 send streamed chat completions (``stream=True``, temperature 0, a random adapter
or the base model each), measuring the time to the first token (TTFT: request sent to the first chunk with text)
and the inter-token latency (ITL: the gaps between consecutive text chunks; the server sends one chunk per
token, except when it holds back a piece a stop string or half a character could still claim). Every streamed
answer must equal the reference answer of the same request; a failed request, a stream without a finish
reason and a different answer are counted and make the script exit with status 1 (after it printed the table).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
import llm_speed  # noqa: E402  (the base model, the adapters' shape, the prompts)

import torch  # noqa: E402


def write_adapters(root: Path, count: int) -> list[str]:
    """``count`` plain adapter folders (PEFT format, written by peftkit) with random non-zero weights."""
    import peftkit

    names = []
    for i in range(count):
        model = peftkit.adapt(llm_speed.load_base(), llm_speed.lora_config(dropout=0.0))
        llm_speed.randomize(model, seed=100 + i)
        name = f"lora{i}"
        model.save_adapter(root / name)
        names.append(name)
    return names


def start_server(adapters: Path, max_batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--task", "causal-lm", "--base", "smollm2",
                                "--adapters", str(adapters), "--port", str(port), "--max_batch_size",
                                str(max_batch_size), "--threads", str(threads)],
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
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not come up within 300 s")


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def reference_answers(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """Each distinct request once, alone, not streamed."""
    api, answers = client(url), {}
    for model, prompt in dict.fromkeys(jobs):
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0)
        answers[(model, prompt)] = reply.choices[0].message.content
    return answers


def load_level(url: str, jobs: list[tuple[str, str]], concurrency: int, expected: dict, max_tokens: int) -> dict:
    lock = threading.Lock()
    queue = list(reversed(jobs))
    ttft, gaps, errors, mismatches, tokens = [], [], [], [], [0]
    start = time.perf_counter()

    def worker() -> None:
        api = client(url)
        while True:
            with lock:
                if not queue:
                    return
                model, prompt = queue.pop()
            sent = time.perf_counter()
            try:
                stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=max_tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
                pieces, stamps, finish, used = [], [], None, 0
                for chunk in stream:
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    if chunk.choices[0].delta.content:
                        stamps.append(time.perf_counter())
                        pieces.append(chunk.choices[0].delta.content)
                    finish = chunk.choices[0].finish_reason or finish
                if finish is None:
                    raise RuntimeError("the stream ended without a finish reason")
                answer = "".join(pieces)
                with lock:
                    tokens[0] += used
                    if stamps:
                        ttft.append(stamps[0] - sent)
                        gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))
                    if answer != expected[(model, prompt)]:
                        mismatches.append(f"{model}: {answer[:60]!r} != {expected[(model, prompt)][:60]!r}")
            except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the load
                with lock:
                    errors.append(f"{type(err).__name__}: {str(err)[:200]}")

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    return {"requests": len(jobs), "errors": errors, "mismatches": mismatches, "seconds": seconds,
            "tokens_per_s": tokens[0] / seconds, "ttft": percentiles(ttft), "itl": percentiles(gaps)}


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    if not values:
        return float("nan"), float("nan")
    values = sorted(values)
    return tuple(values[min(len(values) - 1, int(q * len(values)))] * 1000 for q in (0.50, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 adapters, 8 new tokens, few requests")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--note", default="", help="a line added to the RESULTS.md entry")
    args = parser.parse_args()
    began = time.perf_counter()
    adapters, max_tokens = (2, 8) if args.quick else (4, 64)
    levels = [(1, 4), (8, 8), (16, 16)] if args.quick else [(1, 16), (8, 64), (16, 128)]
    prompts = llm_speed.PROMPTS[:4] if args.quick else llm_speed.PROMPTS
    torch.set_num_threads(args.threads)
    llm_speed.smollm2()  # converted once, before the server needs it
    with tempfile.TemporaryDirectory(prefix="peftkit-llm-serve-") as workdir:
        names = write_adapters(Path(workdir), adapters) + ["base"]
        process, url = start_server(Path(workdir), max_batch_size=16, threads=args.threads)
        try:
            rng = random.Random(0)
            pools = {c: [(rng.choice(names), rng.choice(prompts)) for _ in range(n)] for c, n in levels}
            expected = reference_answers(url, [job for pool in pools.values() for job in pool], max_tokens)
            if len(set(expected.values())) < 2:
                raise SystemExit("every request got the same answer: the adapters change nothing, the check is empty")
            rows, problems = [], []
            for concurrency, _ in levels:
                result = load_level(url, pools[concurrency], concurrency, expected, max_tokens)
                (ttft50, ttft99), (itl50, itl99) = result["ttft"], result["itl"]
                rows.append([str(concurrency), str(result["requests"]), str(len(result["errors"])),
                             str(len(result["mismatches"])), f"{ttft50:.0f}", f"{ttft99:.0f}", f"{itl50:.0f}",
                             f"{itl99:.0f}", f"{result['tokens_per_s']:.1f}"])
                print(f"concurrency {concurrency}: " + ", ".join(rows[-1][1:]), result["errors"][:2],
                      result["mismatches"][:2], flush=True)
                problems += result["errors"][:3] + result["mismatches"][:3]
            alive = process.poll() is None
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    table = common.markdown_table(["concurrency", "requests", "errors", "answers ≠ non-streamed", "TTFT p50 ms",
                                   "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "generated tokens/s"], rows)
    notes = (f"`peftkit serve --task causal-lm --base smollm2 --max_batch_size 16 --threads {args.threads}` with "
             f"{adapters} LoRA all-linear r={llm_speed.RANK} adapters (random non-zero weights); the openai client "
             f"{_version('openai')}, streamed chat completions, temperature 0, max_tokens {max_tokens}, one of "
             f"{len(prompts)} customer-service questions and a random adapter (or the base model) each. Each streamed "
             f"answer is compared with the same request's non-streamed answer sent alone beforehand. Clients run on the "
             f"same machine as the server. Server still up after the run: {alive}."
             + (f" {args.note}" if args.note else ""))
    print(table + "\n\n" + notes)
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)
    if not args.no_append:
        common.append_results("Causal-LM serving: the OpenAI-compatible server under load (openai client)", table, notes)
    if problems or not alive:
        raise SystemExit("FAILED: " + "; ".join(problems[:6]) if problems else "FAILED: the server died")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
