"""Causal-LM speed on SmolLM2-135M-Instruct (``model: smollm2``): peftkit next to Hugging Face PEFT.

(a) One SFT training step, B8×T256 (the first half of each row is "prompt": label -100), LoRA all-linear r=16
    alpha 32 dropout 0.05, fp32: the frozen-base floor (no weight gradients, gradients down to the embeddings),
    peftkit and PEFT, interleaved rounds in one process, medians and ratios. Peak extra memory (RSS over 3 steps,
    one fresh process per workload, as speed.py measures it) against the floor's.
(b) Greedy generation of 128 new tokens (exactly: the end token is suppressed until then), tokens/s: the base
    model, one unmerged LoRA adapter (peftkit, PEFT) at batch 1 and batch 16, and a batch of 16 rows over 8
    different adapters (peftkit ``mixed_batch`` around ``generate``; PEFT ``generate(adapter_names=...)``).

Both libraries hold the same adapters: peftkit writes them (random non-zero B) and PEFT loads the files. Before
anything is timed the script asserts that the two give the same training loss and gradients and the same greedy
tokens, and that the adapters change the output (an empty comparison would prove nothing).

    python benchmarks/llm_speed.py                       # full run (~25 min on 2 idle cores), appends to RESULTS.md
    python benchmarks/llm_speed.py --quick --no-append   # tiny sizes, < 2 min: checks that everything runs
    python benchmarks/llm_speed.py --only generation --no-memory --no-append
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    train_b: int = 8
    train_t: int = 256
    new_tokens: int = 128
    big_batch: int = 16
    adapters: int = 8


FULL, QUICK = Sizes(), Sizes(train_b=2, train_t=32, new_tokens=8, big_batch=4, adapters=2)
TRAIN = ("floor", "peftkit", "peft", "floor/task-loss", "peftkit/task-loss")
RANK, ALPHA, DROPOUT = 16, 32, 0.05
PROMPTS = [
    "How can I cancel my order?",
    "I want to change the shipping address of my order.",
    "What payment methods do you accept?",
    "My invoice shows the wrong amount, what can I do?",
    "How do I reset the password of my account?",
    "I did not receive my refund yet.",
    "Can I speak to a human agent please?",
    "Where is my package?",
]


def smollm2() -> Path:
    from peftkit.tasks.models import smollm2_path

    return smollm2_path()


def load_base():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(smollm2(), dtype=torch.float32)


def lora_config(dropout: float = DROPOUT, shared_dropout_mask: bool = False):
    import peftkit

    return peftkit.LoraConfig(r=RANK, alpha=ALPHA, dropout=dropout, target_modules="all-linear",
                              shared_dropout_mask=shared_dropout_mask)


def randomize(model, seed: int, scale: float = 0.02) -> None:
    """Non-zero B matrices (a fresh LoRA adapter computes nothing yet, which would make every comparison empty)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def adapter_pair(workdir: Path, count: int, trainable: bool):
    """peftkit and PEFT models over two copies of the base, holding the same ``count`` adapters a0, a1, ... (written
    by peftkit, read by PEFT), a0 active."""
    import peft

    import peftkit

    ours = peftkit.adapt(load_base(), lora_config(), adapter_name="a0")
    for i in range(1, count):
        ours.add_adapter(lora_config(), adapter_name=f"a{i}")
    randomize(ours, seed=0)
    for i in range(count):
        ours.save_adapter(workdir, adapter_name=f"a{i}")  # PEFT layout: workdir/a{i}
    theirs = peft.PeftModel.from_pretrained(load_base(), str(workdir / "a0"), adapter_name="a0", is_trainable=trainable)
    for i in range(1, count):
        theirs.load_adapter(str(workdir / f"a{i}"), adapter_name=f"a{i}", is_trainable=trainable)
    ours.set_adapter("a0")
    theirs.set_adapter("a0")
    return ours, theirs


# ------------------------------------------------------------------------------------------------ training
def train_inputs(sizes: Sizes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 40000, (sizes.train_b, sizes.train_t), generator=generator)
    labels = ids.clone()
    labels[:, : sizes.train_t // 2] = -100  # the prompt half: assistant-only loss, as the causal-lm task trains
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def floor_model():
    model = load_base()
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def train_models(workdir: Path) -> dict[str, torch.nn.Module]:
    import peftkit

    ours, theirs = adapter_pair(workdir, 1, trainable=True)
    # the opt-in speed mode: the layers that read one tensor (q/k/v, gate/up) share one dropout mask and run their
    # down-projections as one matmul (PEFT, and peftkit's default, draw a mask per layer); timed, not compared
    shared = peftkit.adapt(load_base(), lora_config(shared_dropout_mask=True), adapter_name="a0")
    with torch.no_grad():  # the same adapter as "peftkit" (non-zero B): only the dropout masks differ
        weights = dict(ours.named_parameters())
        for name, param in shared.named_parameters():
            if param.requires_grad:
                param.copy_(weights[name])
    return {"floor": floor_model(), "peftkit": ours, "peft": theirs, "peftkit-shared": shared}


def check_training(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]) -> str:
    """Same loss and same LoRA gradients in peftkit and PEFT (dropout off), and different from the base model's."""
    losses, grads = {}, {}
    for name, model in models.items():
        model.eval()
        loss = model(**inputs).loss
        losses[name] = loss.item()
        if name in ("floor", "peftkit"):  # the loss of ``peftkit train`` is the same number
            with torch.no_grad():
                ours = task_loss(model, inputs).item()
            if abs(ours - losses[name]) > 1e-5 * abs(losses[name]):
                raise SystemExit(f"{name}: peftkit train's loss {ours} differs from transformers' {losses[name]}")
        if name not in ("floor", "peftkit-shared"):
            loss.backward()
            # the same key in both libraries: "layers.0.self_attn.q_proj.lora_A.a0.weight"
            grads[name] = {k[k.index("layers."):]: p.grad.clone()
                           for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
            model.zero_grad(set_to_none=True)
        model.train()
    if abs(losses["peftkit"] - losses["peft"]) > 1e-4 * abs(losses["peft"]):
        raise SystemExit(f"peftkit and PEFT losses differ: {losses}")
    if "peftkit-shared" in losses and losses["peftkit-shared"] != losses["peftkit"]:
        raise SystemExit(f"the shared-mask model is not the same adapter as peftkit's: {losses}")
    if abs(losses["peftkit"] - losses["floor"]) < 1e-6:
        raise SystemExit(f"the adapter does not change the loss: the comparison would be empty ({losses})")
    ours, theirs = grads["peftkit"], grads["peft"]
    if len(ours) != len(theirs) or not ours:
        raise SystemExit(f"peftkit trains {len(ours)} tensors, PEFT {len(theirs)}")
    if ours.keys() != theirs.keys():
        raise SystemExit(f"peftkit and PEFT train different tensors: {sorted(ours.keys() ^ theirs.keys())[:4]}")
    worst = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp(min=1e-12)).item() for k in ours)
    if worst > 1e-3:
        raise SystemExit(f"peftkit and PEFT LoRA gradients differ (relative {worst:.1e})")
    return (f"peftkit and PEFT agree before timing (dropout off): loss {losses['peftkit']:.5f} vs {losses['peft']:.5f} "
            f"(base {losses['floor']:.5f}); {len(ours)} LoRA gradients agree to {worst:.1e} (relative max abs); "
            f"peftkit train's chunked loss gives the same loss values.")


def task_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mean token loss as ``peftkit train`` computes it (the causal-lm task: only labelled positions go
    through lm_head, in chunks), instead of transformers' loss over the full logits."""
    from peftkit.tasks.causal_lm_loss import conversation_sums

    sums = conversation_sums(model, inputs)
    return sums[:, 0].sum() / sums[:, 1].sum()


def train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], with_task_loss: bool = False
               ) -> Callable[[], None]:
    def step() -> None:
        (task_loss(model, inputs) if with_task_loss else model(**inputs).loss).backward()
        for param in model.parameters():
            param.grad = None

    return step


def memory_child(impl: str, sizes: Sizes) -> None:
    """Run in a fresh process: print the peak extra RSS of 3 training steps of one workload. Only that workload's
    model is ever built here (memory freed by another model would be reused and hide part of the peak)."""
    import peft

    import peftkit

    kind, _, loss = impl.partition("/")
    if kind == "floor":
        model = floor_model()
    elif kind == "peftkit":
        model = peftkit.adapt(load_base(), lora_config())
    else:  # the same configuration (PEFT's all-linear also takes q/k/v/o/gate/up/down and leaves lm_head)
        model = peft.get_peft_model(load_base(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    step = train_step(model.train(), train_inputs(sizes), with_task_loss=loss == "task-loss")
    before = common.rss_bytes()
    common.reset_peak_rss()
    for _ in range(3):
        step()
    print(common.peak_rss_bytes() - before)


def training_part(sizes: Sizes, repeats: int, memory: bool, quick: bool) -> tuple[str, str, list[str]]:
    inputs = train_inputs(sizes)
    with tempfile.TemporaryDirectory(prefix="peftkit-llm-") as workdir:
        models = train_models(Path(workdir))
    check = check_training(models, inputs)
    print(check, flush=True)
    steps = {name: train_step(model, inputs) for name, model in models.items()}
    for name in ("floor", "peftkit"):  # the same models, with the loss of ``peftkit train``
        steps[f"{name}/task-loss"] = train_step(models[name], inputs, with_task_loss=True)
    times = common.interleaved(steps, repeats)
    med = {name: common.median(values) for name, values in times.items()}
    del models
    mem: dict[str, float] = {}
    if memory:
        for impl in TRAIN:
            args = ["--memory-child", impl] + (["--quick"] if quick else [])
            mem[impl] = float(common.run_isolated(Path(__file__).resolve(), args)) / 1e9

    def memory_cell(impl: str) -> str:
        if impl not in mem:
            return "–"
        return f"{mem[impl]:+.2f} GB ({mem[impl] / mem['floor']:.2f}×)"

    floor = med["floor"]
    rows = [["floor (frozen base, input gradients)", f"{floor:.2f}", "1.00", "–", memory_cell("floor")],
            ["PEFT", f"{med['peft']:.2f}", f"{med['peft'] / floor:.2f}", "1.00", memory_cell("peft")],
            ["peftkit", f"{med['peftkit']:.2f}", f"{med['peftkit'] / floor:.2f}", f"{med['peftkit'] / med['peft']:.2f}",
             memory_cell("peftkit")],
            ["peftkit, shared dropout mask (opt-in)", f"{med['peftkit-shared']:.2f}",
             f"{med['peftkit-shared'] / floor:.2f}", f"{med['peftkit-shared'] / med['peft']:.2f}", "–"]]
    # the loss ``peftkit train`` uses (labelled positions only, chunked): a change of the whole step, floor included,
    # so its rows compare with the floor on the same loss; the verdicts above stay on transformers' loss
    task_floor = med["floor/task-loss"]
    rows += [["floor, peftkit train's loss", f"{task_floor:.2f}", f"{task_floor / floor:.2f} (1.00)", "–",
              memory_cell("floor/task-loss")],
             ["peftkit, peftkit train's loss", f"{med['peftkit/task-loss']:.2f}",
              f"{med['peftkit/task-loss'] / floor:.2f} ({med['peftkit/task-loss'] / task_floor:.2f})",
              f"{med['peftkit/task-loss'] / med['peft']:.2f}", memory_cell("peftkit/task-loss")]]
    verdicts = [_verdict("train peftkit/floor", med["peftkit"] / floor, "<=", 1.15),
                _verdict("train peftkit/PEFT", med["peftkit"] / med["peft"], "<=", 0.8)]
    if mem:
        verdicts.append(_verdict("train memory peftkit/floor", mem["peftkit"] / mem["floor"], "<=", 1.1))
    header = [f"SFT train step B{sizes.train_b}×T{sizes.train_t}, LoRA all-linear r={RANK} dropout {DROPOUT}",
              "median s", "× floor", "× PEFT", "peak extra RSS (× floor)"]
    return common.markdown_table(header, rows), check, verdicts


# ---------------------------------------------------------------------------------------------- generation
def prompt_batch(tokenizer, rows: int) -> dict[str, torch.Tensor]:
    """``rows`` chat prompts (cycling through PROMPTS), left-padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                           add_generation_prompt=True) for i in range(rows)]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def generation_part(sizes: Sizes, repeats: int) -> tuple[str, str, list[str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    base = load_base().eval()
    with tempfile.TemporaryDirectory(prefix="peftkit-llm-") as workdir:
        ours, theirs = adapter_pair(Path(workdir), sizes.adapters, trainable=False)
    ours.eval(), theirs.eval()
    one, big = prompt_batch(tokenizer, 1), prompt_batch(tokenizer, sizes.big_batch)
    mixed = [f"a{i % sizes.adapters}" for i in range(sizes.big_batch)]
    options = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)

    def peftkit_generate(inputs, names=None):
        net = ours.base_model  # the adapter layers sit inside it
        if names is None:
            return net.generate(**inputs, **options)
        with ours.mixed_batch(names):
            return net.generate(**inputs, **options)

    def peft_generate(inputs, names=None):
        return theirs.generate(**inputs, **options) if names is None else theirs.generate(**inputs, **options,
                                                                                        adapter_names=names)

    cases = {  # label: (batch, function of one call)
        "base, batch 1": (one, lambda: base.generate(**one, **options)),
        "PEFT unmerged, batch 1": (one, lambda: peft_generate(one)),
        "peftkit unmerged, batch 1": (one, lambda: peftkit_generate(one)),
        f"base, batch {sizes.big_batch}": (big, lambda: base.generate(**big, **options)),
        f"PEFT unmerged, batch {sizes.big_batch}": (big, lambda: peft_generate(big)),
        f"peftkit unmerged, batch {sizes.big_batch}": (big, lambda: peftkit_generate(big)),
        f"PEFT mixed, {sizes.adapters} adapters": (big, lambda: peft_generate(big, mixed)),
        f"peftkit mixed, {sizes.adapters} adapters": (big, lambda: peftkit_generate(big, mixed)),
    }
    with torch.inference_mode():
        check = check_generation(cases, sizes)
    print(check, flush=True)

    def timed(call):
        def run() -> None:
            with torch.inference_mode():
                call()
        return run

    times = common.interleaved({label: timed(call) for label, (_, call) in cases.items()}, repeats)
    rate = {label: cases[label][0]["input_ids"].shape[0] * sizes.new_tokens / common.median(times[label])
            for label in cases}
    rows, verdicts = [], []
    for label in cases:
        batch = cases[label][0]["input_ids"].shape[0]
        reference = rate[f"base, batch {batch}"]
        rows.append([label, f"{common.median(times[label]):.2f}", f"{rate[label]:.1f}", f"{rate[label] / reference:.2f}"])
        if label.startswith("peftkit"):
            target = 0.85 if "mixed" in label else 0.95
            verdicts.append(_verdict(f"generation {label} / base", rate[label] / reference, ">=", target))
    header = [f"greedy generation, {sizes.new_tokens} new tokens, LoRA all-linear r={RANK}", "median s", "tokens/s",
              "× base (same batch)"]
    return common.markdown_table(header, rows), check, verdicts


def check_generation(cases: dict, sizes: Sizes) -> str:
    """peftkit and PEFT produce the same greedy tokens in every case; the adapters change them; each mixed row equals
    the row its adapter gives alone."""
    out = {label: call() for label, (_, call) in cases.items()}
    big = sizes.big_batch
    pairs = [("PEFT unmerged, batch 1", "peftkit unmerged, batch 1"),
             (f"PEFT unmerged, batch {big}", f"peftkit unmerged, batch {big}"),
             (f"PEFT mixed, {sizes.adapters} adapters", f"peftkit mixed, {sizes.adapters} adapters")]
    for theirs, ours in pairs:
        if not torch.equal(out[theirs], out[ours]):
            diverge = (out[theirs] != out[ours]).nonzero()[0].tolist()
            raise SystemExit(f"greedy tokens differ: {ours} vs {theirs} (first at row, position {diverge})")
    for adapted in ("peftkit unmerged, batch 1", f"peftkit unmerged, batch {big}", f"peftkit mixed, {sizes.adapters} adapters"):
        if torch.equal(out[adapted], out["base, batch 1" if "batch 1" in adapted else f"base, batch {big}"]):
            raise SystemExit(f"{adapted}: the adapters do not change the tokens; the comparison would be empty")
    mixed = out[f"peftkit mixed, {sizes.adapters} adapters"]
    rows_a0 = mixed[0::sizes.adapters]  # rows of adapter a0 equal what a0 alone (the active adapter) generates
    if not torch.equal(rows_a0, out[f"peftkit unmerged, batch {big}"][0::sizes.adapters]):
        raise SystemExit("mixed-batch rows of adapter a0 differ from a0 alone")
    return (f"peftkit and PEFT generate the same greedy tokens (batch 1, batch {big}, {big} rows over {sizes.adapters} "
            f"adapters), all different from the base model's; mixed rows of a0 equal a0 alone.")


# -------------------------------------------------------------------------------------------------- main
def _verdict(label: str, value: float, op: str, target: float) -> str:
    ok = value <= target if op == "<=" else value >= target
    return f"{'PASS' if ok else 'MISS'} {label}: {value:.2f} (target {op} {target})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5; --quick: 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (B2×T32, 8 new tokens, batch 4, 2 adapters)")
    parser.add_argument("--only", choices=["training", "generation"], help="run one part")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--note", default="", help="a line added to the RESULTS.md entry (e.g. how the machine was loaded)")
    parser.add_argument("--memory-child", choices=TRAIN, help=argparse.SUPPRESS)
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.memory_child:  # memory is measured with the allocator a user gets by default, as speed.py does
        memory_child(args.memory_child, sizes)
        return
    from peftkit.ops.memory import keep_freed_memory

    keep_freed_memory()  # for the timings: the same allocator behaviour for every workload (see speed.py)
    tables, checks, verdicts = [], [], []
    if args.only != "generation":
        table, check, verdict = training_part(sizes, args.repeats, not args.no_memory, args.quick)
        print(table, flush=True)
        tables.append(table), checks.append(check), verdicts.extend(verdict)
    if args.only != "training":
        table, check, verdict = generation_part(sizes, args.repeats)
        print(table, flush=True)
        tables.append(table), checks.append(check), verdicts.extend(verdict)
    print("\n".join(verdicts))
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)
    if not args.no_append:
        from importlib.metadata import version

        notes = (f"Medians of {args.repeats} interleaved rounds; fp32; {args.threads} threads; SmolLM2-135M-Instruct "
                 f"(dequantized Q4_1); PEFT {version('peft')}, transformers {version('transformers')}. "
                 + " ".join(checks) + "\n\n" + "  \n".join(verdicts) + (f"\n\n{args.note}" if args.note else ""))
        common.append_results("Causal LM (SmolLM2): SFT step, memory and generation, peftkit vs PEFT",
                              "\n\n".join(tables), notes)


if __name__ == "__main__":
    main()
