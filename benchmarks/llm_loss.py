"""The causal-LM loss of ``peftkit train`` against transformers' loss, on SmolLM2-135M-Instruct, B8×T256 with the first
half of each row prompt (label -100): step time (forward + backward, interleaved rounds in one process, medians) and
peak extra RSS (one fresh process per workload), for LoRA all-linear r=16 (frozen ``lm_head``: gradients computed in
the forward pass) and full fine-tuning (trainable, tied ``lm_head``: logits recomputed once in backward).

Before timing, the script checks that both losses give the same value and, for full fine-tuning, the same gradient
of the tied embedding/head matrix.

    python benchmarks/llm_loss.py                      # ~10 min on 2 idle cores, appends to RESULTS.md
    python benchmarks/llm_loss.py --quick --no-append  # tiny sizes: checks that everything runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import llm_speed  # noqa: E402

import torch  # noqa: E402

METHODS = ("lora", "full")
WORKLOADS = tuple(f"{method}/{loss}" for method in METHODS for loss in ("transformers", "peftkit"))


def build(method: str) -> torch.nn.Module:
    import peftkit

    if method == "lora":
        model = peftkit.adapt(llm_speed.load_base(), llm_speed.lora_config())
        llm_speed.randomize(model, seed=0)
    else:
        model = llm_speed.load_base()
        for param in model.parameters():
            param.requires_grad_(True)
    return model.train()


def check(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]) -> str:
    lines = []
    for method, model in models.items():
        model.eval()
        plain = model(**inputs).loss
        ours = llm_speed.task_loss(model, inputs)
        if abs(plain.item() - ours.item()) > 1e-5 * abs(plain.item()):
            raise SystemExit(f"{method}: peftkit's loss {ours.item()} differs from transformers' {plain.item()}")
        detail = ""
        if method == "full":
            head = model.get_output_embeddings().weight
            (g_plain,) = torch.autograd.grad(plain, head)
            (g_ours,) = torch.autograd.grad(ours, head)
            worst = ((g_ours - g_plain).abs().max() / g_plain.abs().max()).item()
            if worst > 1e-4:
                raise SystemExit(f"full fine-tuning: head gradients differ (relative {worst:.1e})")
            detail = f", head gradient equal to {worst:.1e} (relative max abs)"
        lines.append(f"{method}: loss {ours.item():.5f} vs {plain.item():.5f}{detail}")
        model.train()
    return "Same values before timing (dropout off): " + "; ".join(lines) + "."


def memory_child(workload: str, sizes: llm_speed.Sizes) -> None:
    method, _, loss = workload.partition("/")
    step = llm_speed.train_step(build(method), llm_speed.train_inputs(sizes), with_task_loss=loss == "peftkit")
    before = common.rss_bytes()
    common.reset_peak_rss()
    for _ in range(3):
        step()
    print(common.peak_rss_bytes() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5; --quick: 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="B2×T32")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--memory-child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    sizes = llm_speed.QUICK if args.quick else llm_speed.FULL
    repeats = args.repeats or (2 if args.quick else 5)
    if args.memory_child:  # the allocator a user gets by default, as the other memory figures
        memory_child(args.memory_child, sizes)
        return
    from peftkit.ops.memory import keep_freed_memory

    keep_freed_memory()  # for the timings, as peftkit train and the other benchmarks do
    inputs = llm_speed.train_inputs(sizes)
    models = {method: build(method) for method in METHODS}
    checked = check(models, inputs)
    print(checked, flush=True)
    steps = {f"{method}/{loss}": llm_speed.train_step(models[method], inputs, with_task_loss=loss == "peftkit")
             for method in METHODS for loss in ("transformers", "peftkit")}
    times = common.interleaved(steps, repeats)
    del models, steps
    med = {name: common.median(values) for name, values in times.items()}
    memory = {name: float(common.run_isolated(Path(__file__).resolve(),
                                              ["--memory-child", name] + (["--quick"] if args.quick else []))) / 1e9
              for name in WORKLOADS}
    rows = []
    for method in METHODS:
        plain, ours = f"{method}/transformers", f"{method}/peftkit"
        label = "LoRA all-linear r=16 (frozen head)" if method == "lora" else "full fine-tuning (trainable tied head)"
        rows.append([label, f"{med[plain]:.2f}", f"{med[ours]:.2f}", f"{med[ours] / med[plain]:.2f}",
                     f"{memory[plain]:+.2f} GB", f"{memory[ours]:+.2f} GB", f"{memory[ours] - memory[plain]:+.2f} GB"])
    header = [f"train step B{sizes.train_b}×T{sizes.train_t}, half prompt", "transformers' loss, s", "peftkit's, s",
              "ratio", "peak extra RSS, transformers'", "peftkit's", "difference"]
    table = common.markdown_table(header, rows)
    print(table)
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)
    if not args.no_append:
        notes = (f"Medians of {repeats} interleaved rounds (forward + backward, no optimizer step); fp32; {args.threads} "
                 f"threads; SmolLM2-135M-Instruct (dequantized Q4_1); memory: 3 steps in a fresh process per "
                 f"workload. {checked}")
        common.append_results("Causal-LM loss: peftkit train's chunked loss vs transformers' (SmolLM2)", table, notes)


if __name__ == "__main__":
    main()
