"""Accuracy parity with Hugging Face PEFT: the same LoRA fine-tuning through both libraries, seed by seed.

    nice -n 5 python benchmarks/parity.py --log parity.jsonl           # fpb + sst2, 5 seeds, 3 arms
    python benchmarks/parity.py --table-only --log parity.jsonl        # the table from the results logged so far
    python benchmarks/parity.py --speed                                # shared vs independent masks: step time

Setup: the packaged all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` (CLS pooler + classifier), LoRA
r=8, alpha 16, dropout 0.1 on query, key, value and every module named ``dense`` (attention.output.dense,
intermediate.dense, output.dense and pooler.dense: every Linear but the classifier), the classifier trained
whole. One plain PyTorch loop for every arm: AdamW (lr 1e-3, weight decay 0.01), 6% warm-up then linear
decay, batch 32, max_length 64, fp32, 2 epochs over a fixed 2,000-text training subset. Per seed every arm gets
the same data order, the same classifier initialisation and the same initial LoRA A matrices (B starts at 0);
what differs is the library's implementation and its dropout masks. The final model is evaluated once on the
held-out set (fpb: the fixed 20% split of ``quality.py``; sst2: GLUE dev). Arms run interleaved per seed.

Arms: ``peft`` (PEFT 0.21, one dropout per layer), ``peftkit`` (default: one mask per layer, as PEFT) and
``peftkit-shared`` (``shared_dropout_mask=True``: q, k, v share one mask).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality  # noqa: E402

import torch  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
R, ALPHA, DROPOUT = 8, 16, 0.1
ARMS = ("peft", "peftkit", "peftkit-shared")


# ------------------------------------------------------------------------------------------------- data
def load(dataset: str, workdir: Path, size: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train texts, train labels, eval texts, eval labels): the subset and split of ``quality.prepare``."""
    keys = quality.prepare(dataset, workdir, size)

    def read(path: str) -> tuple[list[str], list[str]]:
        with open(path, newline="", encoding="utf-8") as handle:
            if path.endswith(".tsv"):
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(handle)
            header = next(reader)
            text_at, label_at = header.index(keys["text_column"]), header.index(keys["label_column"])
            rows = [row for row in reader if row]
        return [r[text_at] for r in rows], [r[label_at] for r in rows]

    return (*read(keys["train_file"]), *read(keys["dev_file"]))


# ------------------------------------------------------------------------------------------------ models
def build(arm: str, seed: int, num_labels: int):
    """The model of one arm; the classifier comes from the seeded RNG, so every arm of a seed gets the same."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=num_labels)
    if arm == "peft":
        import peft

        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="SEQ_CLS")
        model = peft.get_peft_model(model, config)
        layers = {path.removeprefix("base_model.model."): m for path, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    else:
        import peftkit
        from peftkit.layers.lora import LoraLayer

        config = peftkit.LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS,
                                    shared_dropout_mask=arm == "peftkit-shared")
        model = peftkit.adapt(model, config)
        layers = {path: m for path, m in model.base_model.named_modules() if isinstance(m, LoraLayer)}
    # the same initial A for every arm (B is zero in both libraries)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for path in sorted(layers):
            weight = layers[path].lora_A["default"].weight
            bound = 1 / math.sqrt(weight.shape[1])  # kaiming-uniform(a=√5), the default of both libraries
            weight.copy_(torch.rand(weight.shape, generator=generator) * 2 * bound - bound)
    return model, sorted(layers)


def head_of(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith("classifier.weight") or
                n.endswith("classifier.modules_to_save.default.weight")).detach().clone()


# ------------------------------------------------------------------------------------------------ training
def run(arm: str, seed: int, data, args) -> dict:
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    train_x, train_y, eval_x, eval_y = data
    labels = sorted(set(train_y))
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    model, targets = build(arm, seed, len(labels))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    head = head_of(model)
    encoded = tokenizer(train_x, truncation=True, max_length=args.max_length)
    y = torch.tensor([labels.index(v) for v in train_y])

    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * total), total)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the base model's own dropouts
    model.train()
    start = time.perf_counter()
    losses = []
    for _ in range(args.epochs):
        permutation = torch.randperm(len(train_x), generator=order).tolist()
        for first in range(0, len(permutation), args.batch_size):
            rows = permutation[first: first + args.batch_size]
            batch = tokenizer.pad({"input_ids": [encoded["input_ids"][i] for i in rows],
                                   "attention_mask": [encoded["attention_mask"][i] for i in rows]}, return_tensors="pt")
            loss = model(**batch, labels=y[rows]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, tokenizer, eval_x, [labels.index(v) for v in eval_y], args.max_length)
    return {"arm": arm, "seed": seed, "accuracy": accuracy, "final_loss": statistics.mean(losses[-10:]),
            "seconds": seconds, "trainable": trainable, "targets": len(targets),
            "head_checksum": float(head.double().sum()), "target_paths": targets}


@torch.no_grad()
def evaluate(model, tokenizer, texts: list[str], labels: list[int], max_length: int) -> float:
    model.eval()
    correct = 0
    for first in range(0, len(texts), 128):
        batch = tokenizer(texts[first: first + 128], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1)
        correct += int((predicted == torch.tensor(labels[first: first + 128])).sum())
    return correct / len(texts)


# ------------------------------------------------------------------------------------------------ table
def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(results: list[dict], datasets: list[str], arms: list[str], seeds: list[int]) -> str:
    header = ["dataset", "arm"] + [f"seed {s}" for s in seeds] + ["mean ± std"]
    rows = []
    for dataset in datasets:
        acc = {(r["arm"], r["seed"]): 100 * r["accuracy"] for r in results if r["dataset"] == dataset}
        for arm in arms:
            values = [acc[(arm, s)] for s in seeds if (arm, s) in acc]
            rows.append([dataset, arm] + [f"{acc[(arm, s)]:.2f}" if (arm, s) in acc else "-" for s in seeds]
                        + [mean_std(values)])
        for arm in arms:
            if arm == "peft" or "peft" not in arms:
                continue
            diffs = {s: acc[(arm, s)] - acc[("peft", s)] for s in seeds if (arm, s) in acc and ("peft", s) in acc}
            rows.append([dataset, f"{arm} − peft"] + [f"{diffs[s]:+.2f}" if s in diffs else "-" for s in seeds]
                        + [mean_std(list(diffs.values()))])
    return common.markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------ speed
def speed(repeats: int) -> str:
    """One all-linear LoRA train step (batch 32 x 128 tokens, dropout 0.1): independent vs shared masks."""
    from transformers import AutoModelForSequenceClassification

    import peftkit

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 128), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (32,), generator=generator)}
    steps = {}
    for shared in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=2)
        model = peftkit.adapt(model, peftkit.LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear",
                                                        shared_dropout_mask=shared)).train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, params=params) -> None:
            model(**inputs).loss.backward()
            for param in params:
                param.grad = None

        steps["shared mask (q, k, v)" if shared else "independent masks (default)"] = step
    times = common.interleaved(steps, repeats=repeats, warmup=2)
    base = common.median(times["independent masks (default)"])
    rows = [[name, f"{1000 * common.median(t):.0f}", f"{common.median(t) / base:.3f}"] for name, t in times.items()]
    return common.markdown_table(["peftkit LoRA all-linear r=8 dropout 0.1, train step", "median ms", "vs default"], rows)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fpb,sst2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", help="JSON lines: every result is appended as it comes; results already there are "
                                      "reused (an interrupted run resumes)")
    parser.add_argument("--table-only", action="store_true", help="print the table of the results in --log")
    parser.add_argument("--speed", action="store_true", help="time one train step with shared vs independent masks")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of --speed")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        result = speed(args.repeats)
        print(result)
        if args.append:
            common.append_results("Parity: cost of independent LoRA dropout masks", result)
        return
    datasets, arms = args.datasets.split(","), args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"train_size": args.train_size, "epochs": args.epochs, "batch_size": args.batch_size,
                "max_length": args.max_length, "lr": args.lr}
    results = []
    if args.log and Path(args.log).exists():
        results = [r for r in map(json.loads, Path(args.log).read_text().splitlines())
                   if all(r.get(k) == v for k, v in settings.items())]
    if not args.table_only:
        with tempfile.TemporaryDirectory(prefix="peftkit-parity-") as workdir:
            for dataset in datasets:
                data = load(dataset, Path(workdir), args.train_size)
                for seed in seeds:
                    done = [r for r in results if r["dataset"] == dataset and r["seed"] == seed]
                    for arm in arms:
                        if any(r["arm"] == arm for r in done):
                            continue
                        result = {"dataset": dataset, **settings, **run(arm, seed, data, args)}
                        # the controls of a paired comparison: same head, same targets, same trainable size
                        for other in done:
                            for key in ("head_checksum", "target_paths", "trainable"):
                                if other[key] != result[key]:
                                    raise SystemExit(f"{dataset} seed {seed}: {arm} and {other['arm']} differ in {key}")
                        done.append(result)
                        results.append(result)
                        if args.log:
                            with open(args.log, "a", encoding="utf-8") as handle:
                                handle.write(json.dumps(result) + "\n")
                        print(f"{dataset:5s} seed {seed} {arm:15s} acc {100 * result['accuracy']:.2f}  "
                              f"loss {result['final_loss']:.3f}  {result['seconds']:.0f} s", flush=True)
    result = table(results, datasets, arms, seeds)
    print(result)
    if args.append:
        notes = (f"{args.train_size} training texts, {args.epochs} epochs, batch {args.batch_size}, max_length "
                 f"{args.max_length}, lr {args.lr:g}; LoRA r={R} alpha={ALPHA} dropout {DROPOUT} on {', '.join(TARGETS)}; "
                 "accuracy % on the held-out set; per seed: same data order, head init and initial A in every arm.")
        common.append_results("Parity: LoRA accuracy, peftkit vs PEFT", result, notes)


if __name__ == "__main__":
    main()
