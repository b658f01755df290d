"""Training-step and inference speed, and peak training memory: peftkit next to Hugging Face PEFT.

Everything runs on the packaged all-MiniLM-L6-v2 (22.7M parameters) with the same inputs. Timings are
interleaved in one process (floor, full, PEFT, peftkit, floor, full, ...) and reported as medians and as
ratios, because absolute times on a shared machine swing by ±30%. Peak memory is measured one workload per
fresh process (peak RSS over 3 training steps, minus RSS with the model loaded and adapted).

    python benchmarks/speed.py                 # full run, appends the table to benchmarks/RESULTS.md
    python benchmarks/speed.py --repeats 3 --no-memory --no-append   # a quick look
    python benchmarks/speed.py --only "fast mode" --repeats 1 --no-memory --no-inference --no-append  # some rows

"fast mode" rows apply ``peftkit.fast_training`` (fast dropout masks for the base model's own dropouts and
attention dropout) to both sides: to the PEFT model as well as to peftkit's, so each row compares like with like.

The "floor" is the frozen base model with gradients flowing down to the embeddings: forward plus the
activation-gradient backward, no weight gradients. Every method that keeps the base model's own computation
pays at least that.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

TRAIN_B, TRAIN_T = 32, 128
INFER_B, INFER_T = 64, 64


@dataclass(frozen=True)
class Workload:
    name: str
    impl: str  # "base", "peft" or "peftkit"
    targets: object = None
    dropout: float = 0.0
    bf16: str = ""  # "" (fp32), "autocast" (fp32 weights under autocast), "base" (frozen base cast to bf16 + autocast)
    checkpointing: bool = False
    fast: bool = False


TRAIN = [
    Workload("floor", "floor"),
    Workload("full fine-tuning", "full"),
    Workload("LoRA q,v r=8 dropout 0.1", "peft", ["query", "value"], 0.1),
    Workload("LoRA q,v r=8 dropout 0.1", "peftkit", ["query", "value"], 0.1),
    Workload("LoRA all-linear r=8 dropout 0.0", "peft", "all-linear", 0.0),
    Workload("LoRA all-linear r=8 dropout 0.0", "peftkit", "all-linear", 0.0),
    Workload("LoRA all-linear r=8 dropout 0.1", "peft", "all-linear", 0.1),
    Workload("LoRA all-linear r=8 dropout 0.1", "peftkit", "all-linear", 0.1),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 autocast", "peft", "all-linear", 0.1, bf16="autocast"),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 autocast", "peftkit", "all-linear", 0.1, bf16="autocast"),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 base + autocast", "peft", "all-linear", 0.1, bf16="base"),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 base + autocast", "peftkit", "all-linear", 0.1, bf16="base"),
    # fast mode changes the base model's own dropout (and attention dropout): PEFT gets the same
    # peftkit.fast_training call, so that each fast row compares like with like
    Workload("LoRA all-linear r=8 dropout 0.1, fast mode", "peft", "all-linear", 0.1, fast=True),
    Workload("LoRA all-linear r=8 dropout 0.1, fast mode", "peftkit", "all-linear", 0.1, fast=True),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 base + autocast, fast mode", "peft", "all-linear", 0.1,
             bf16="base", fast=True),
    Workload("LoRA all-linear r=8 dropout 0.1, bf16 base + autocast, fast mode", "peftkit", "all-linear", 0.1,
             bf16="base", fast=True),
]
MEMORY_EXTRA = [
    Workload("LoRA all-linear r=8 dropout 0.1, gradient checkpointing", "peftkit", "all-linear", 0.1, checkpointing=True),
    Workload("LoRA all-linear r=8 dropout 0.1, gradient checkpointing, fast mode", "peftkit", "all-linear", 0.1,
             checkpointing=True, fast=True),
    Workload("floor, gradient checkpointing", "floor", checkpointing=True),
]


def load_base(num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=num_labels)


def build(work: Workload, device: str) -> torch.nn.Module:
    model = load_base()
    if work.impl == "floor":
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()
    elif work.impl == "peft":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=work.dropout, target_modules=work.targets,
                                 task_type="SEQ_CLS")
        if work.bf16 == "base":
            model = model.to(torch.bfloat16)  # PEFT keeps the adapters in fp32 (autocast_adapter_dtype)
        model = peft.get_peft_model(model, config)
    elif work.impl == "peftkit":
        import peftkit

        model = peftkit.adapt(model, peftkit.LoraConfig(r=8, alpha=16, dropout=work.dropout, target_modules=work.targets))
        if work.checkpointing:
            model.enable_gradient_checkpointing()
        if work.bf16 == "base":
            model.cast_frozen(torch.bfloat16)
    if work.fast:
        import peftkit

        # on a PEFT model too: every nn.Dropout (the base model's and PEFT's lora_dropout) and SDPA attention
        # dropout use the fast mask, as in peftkit's fast mode
        peftkit.fast_training(model)
    if work.checkpointing and work.impl != "peftkit":
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def train_inputs(device: str):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (TRAIN_B, TRAIN_T), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (TRAIN_B,), generator=generator).to(device)}


def train_step(model, inputs, work: Workload, device: str) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if work.bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        for param in params:
            param.grad = None
        _sync(device)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- inference
def inference_models(device: str) -> dict[str, Callable[[], None]]:
    import peft

    import peftkit

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (INFER_B, INFER_T), generator=generator).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def randomized(model):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        return model

    base = load_base().to(device).eval()
    peft_model = randomized(peft.get_peft_model(load_base(), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"))).to(device).eval()
    ours = randomized(peftkit.adapt(load_base(), peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))).to(device).eval()
    peft_merged = randomized(peft.get_peft_model(load_base(), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"))).merge_and_unload().to(device).eval()
    ours_merged = randomized(peftkit.adapt(load_base(), peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear")))
    ours_merged.merge()
    ours_merged = ours_merged.to(device).eval()

    def runner(model):
        def run() -> None:
            with torch.no_grad():
                model(**inputs)
            _sync(device)
        return run

    return {"base": runner(base), "peft unmerged": runner(peft_model), "peftkit unmerged": runner(ours),
            "peft merged": runner(peft_merged), "peftkit merged": runner(ours_merged)}


# ------------------------------------------------------------------------------------------------ memory
def memory_child(index: int, extra: bool, device: str) -> None:
    """Run in a fresh process: print the peak extra bytes of 3 training steps."""
    work = (MEMORY_EXTRA if extra else TRAIN)[index]
    model = build(work, device)
    inputs = train_inputs(device)
    step = train_step(model, inputs, work, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        print(torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated() - before)
        return
    before = common.rss_bytes()
    common.reset_peak_rss()
    with common.PeakSampler() as live:
        for _ in range(3):
            step()
    print(common.peak_rss_bytes() - before, live.peak)


def measure_memory(device: str, malloc_default: bool) -> dict[tuple[str, str], tuple[float, float]]:
    script = Path(__file__).resolve()
    out = {}
    for extra, works in ((False, TRAIN), (True, MEMORY_EXTRA)):
        for index, work in enumerate(works):
            args = ["--memory-child", str(index), "--device", device] + (["--memory-extra"] if extra else [])
            args += ["--malloc-default"]  # memory is measured with the allocator a user gets by default
            rss, live = common.run_isolated(script, args).split()
            out[(work.name, work.impl)] = (float(rss) / 1e9, float(live) / 1e9)
    return out


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--only", help="time only the training rows whose name contains this text (and the floor)")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc trimming on (see peftkit/ops/memory.py); by default the benchmark "
                             "keeps freed memory, so that workloads of different sizes do not fault each other's pages in")
    parser.add_argument("--note", default="", help="a line added to the RESULTS.md entry (e.g. how the machine was loaded)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-extra", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.malloc_default:
        from peftkit.ops.memory import keep_freed_memory

        keep_freed_memory()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.memory_extra, args.device)
        return

    inputs = train_inputs(args.device)
    steps = {}
    for work in TRAIN:
        if args.only and args.only not in work.name and work.impl != "floor":
            continue
        steps[(work.name, work.impl)] = train_step(build(work, args.device), inputs, work, args.device)
    times = common.interleaved({f"{k[1]}|{k[0]}": v for k, v in steps.items()}, args.repeats)
    med = {tuple(reversed(k.split("|", 1))): common.median(v) for k, v in times.items()}
    floor = med[("floor", "floor")]
    memory = measure_memory(args.device, args.malloc_default) if not args.no_memory else {}
    floor_mem = memory.get(("floor", "floor"))

    def mem(name, impl):
        value = memory.get((name, impl))
        if value is None or floor_mem is None:
            return "–"
        (rss, live), (floor_rss, floor_live) = value, floor_mem
        return f"{rss:+.2f} GB ({rss / floor_rss:.2f}×), live {live:.2f} GB ({live / floor_live:.2f}×)"

    rows = [["floor (frozen base, input gradients)", "–", f"{floor:.3f}", "–", "–", "1.00", mem("floor", "floor")]]
    if ("full fine-tuning", "full") in med:
        rows.append(["full fine-tuning", "–", f"{med[('full fine-tuning', 'full')]:.3f}", "–", "–",
                     f"{med[('full fine-tuning', 'full')] / floor:.2f}", mem("full fine-tuning", "full")])
    for name in dict.fromkeys(w.name for w in TRAIN if w.impl == "peftkit" and (w.name, w.impl) in med):
        ours, theirs = med[(name, "peftkit")], med.get((name, "peft"))
        if theirs is None:
            rows.append([name, "–", f"{ours:.3f}", "–", "–", f"{ours / floor:.2f}", f"peftkit {mem(name, 'peftkit')}"])
            continue
        rows.append([name, f"{theirs:.3f}", f"{ours:.3f}", f"{ours / theirs:.2f}", f"{theirs / floor:.2f}",
                     f"{ours / floor:.2f}", f"PEFT {mem(name, 'peft')}; peftkit {mem(name, 'peftkit')}"])
    for work in MEMORY_EXTRA:
        rows.append([work.name, "–", "–", "–", "–", "–", f"{work.impl} {mem(work.name, work.impl)}"])
    header = ["training step (B32×T128)", "PEFT s", "peftkit s", "peftkit/PEFT", "PEFT/floor", "peftkit/floor",
              "peak extra memory: RSS (× floor), live heap (× floor)"]
    table = common.markdown_table(header, rows)

    if not args.no_inference:
        runs = inference_models(args.device)
        itimes = common.interleaved(runs, args.repeats * 2)
        imed = {k: common.median(v) for k, v in itimes.items()}
        base = imed["base"]
        irows = [[name, f"{value * 1000:.1f}", f"{value / base:.3f}"] for name, value in imed.items()]
        table += "\n\n" + common.markdown_table([f"inference, all-linear r=8 (B{INFER_B}×T{INFER_T}, no grad)",
                                                 "median ms", "× base"], irows)
    print(table)
    if not args.no_append:
        notes = (f"Medians of {args.repeats} interleaved rounds (inference: {args.repeats * 2}); fp32 unless noted; "
                 f"{args.threads} threads; PEFT {_version('peft')}, transformers {_version('transformers')}; glibc malloc "
                 + ("default." if args.malloc_default else "set to keep freed memory (peftkit.ops.memory), for every workload.")
                 + (f" {args.note}" if args.note else ""))
        common.append_results("Speed and memory: peftkit vs Hugging Face PEFT", table, notes)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
