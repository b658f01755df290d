"""Accuracy of the training methods on real data, with the packaged all-MiniLM-L6-v2.

    python benchmarks/quality.py                      # full, LoRA q,v / all-linear, head at the full budget (~1.5 h)
    python benchmarks/quality.py --methods all --budget compare   # all 10 methods, smaller budget (~2 h)
    python benchmarks/quality.py --quick              # 2,000 training examples, 1 epoch: a few minutes
    python benchmarks/quality.py --datasets fpb --methods lora-all,full

Datasets (read from ../shared/data, never copied into the repository):
- sst2: GLUE SST-2, the full train set (67,349), evaluated on the 872 GLUE dev sentences;
- banking77: BANKING77 train (10,003) / test (3,080), 77 intents;
- fpb: Financial PhraseBank Sentences_50Agree (4,846), a fixed seeded stratified 80/20 split.

Every run trains with ``peftkit train`` in a fresh process (settings below, the same for every method except the
learning rate) and the final model is evaluated once on the evaluation set (no checkpoint is picked on it).
Peak memory is the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

COMMON = {"model": "minilm", "pooling": "auto", "max_length": 64, "batch_size": 32, "warmup_ratio": 0.06,
          "lr_scheduler": "linear", "eval_strategy": "no", "seed": 0, "quiet": True, "num_threads": 2}
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}
METHODS = {
    "full": {"method": "full", "learning_rate": 1e-4},
    "lora-qv": {"method": "lora", "lora": {**LORA, "target_modules": ["query", "value"]}, "learning_rate": 1e-3},
    "lora-all": {"method": "lora", "lora": {**LORA, "target_modules": "all-linear"}, "learning_rate": 1e-3},
    "head": {"method": "head", "head": {"cache_features": True}, "learning_rate": 5e-3},
    "dora": {"method": "dora", "dora": {**LORA, "target_modules": "all-linear"}, "learning_rate": 1e-3},
    "adalora": {"method": "adalora", "adalora": {"init_r": 12, "target_r": 8, "alpha": 16, "dropout": 0.1,
                                                 "target_modules": "all-linear"}, "learning_rate": 1e-3},
    "houlsby": {"method": "bottleneck", "bottleneck": {"variant": "houlsby", "reduction_factor": 16}, "learning_rate": 1e-3},
    "pfeiffer": {"method": "bottleneck", "bottleneck": {"variant": "pfeiffer", "reduction_factor": 16}, "learning_rate": 1e-3},
    "bitfit": {"method": "bitfit", "learning_rate": 1e-3},
    "lora-all+distill": {"method": "lora", "lora": {**LORA, "target_modules": "all-linear"}, "learning_rate": 1e-3,
                         "distill": {"teacher": "base", "alpha": 0.3, "mode": "hidden"}},
}
ISSUE4_METHODS = "full,lora-qv,lora-all,head"
BUDGETS = {  # epochs and training-set size per dataset
    "full": {"sst2": (2, None), "banking77": (6, None), "fpb": (6, None)},
    "compare": {"sst2": (1, 20000), "banking77": (3, None), "fpb": (4, None)},
    "short": {"sst2": (1, 8000), "banking77": (2, None), "fpb": (3, None)},
    "quick": {"sst2": (1, 2000), "banking77": (1, 2000), "fpb": (1, 2000)},
}


# ------------------------------------------------------------------------------------------------- data
def prepare(dataset: str, workdir: Path, size: int | None) -> dict:
    """Write the dataset as CSV/TSV files peftkit reads; returns the config keys for them."""
    if dataset == "sst2":
        train, dev = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"
        keys = {"train_file": str(train), "dev_file": str(dev), "text_column": "sentence", "label_column": "label"}
    elif dataset == "banking77":
        keys = {"train_file": str(DATA / "banking77" / "train.csv"), "dev_file": str(DATA / "banking77" / "test.csv"),
                "text_column": "text", "label_column": "category"}
    elif dataset == "fpb":
        rows = []
        with open(DATA / "financial_phrasebank" / "Sentences_50Agree.txt", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                text, _, label = line.strip().rpartition("@")
                if text and label:
                    rows.append((text, label))
        by_label: dict[str, list] = {}
        for row in rows:
            by_label.setdefault(row[1], []).append(row)
        rng = random.Random(20240101)
        train, test = [], []
        for label in sorted(by_label):
            group = by_label[label]
            rng.shuffle(group)
            cut = int(round(0.2 * len(group)))
            test += group[:cut]
            train += group[cut:]
        rng.shuffle(train)
        keys = {"train_file": str(_write(workdir / "fpb_train.csv", train)),
                "dev_file": str(_write(workdir / "fpb_test.csv", test)), "text_column": "text", "label_column": "label"}
    else:
        raise SystemExit(f"unknown dataset {dataset!r}")
    if size:
        keys["train_file"] = str(_subset(Path(keys["train_file"]), workdir / f"{dataset}_{size}{Path(keys['train_file']).suffix}", size))
    return keys


def _write(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _subset(source: Path, target: Path, count: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines()
    body = lines[1:]
    random.Random(0).shuffle(body)
    target.write_text("\n".join([lines[0]] + body[:count]) + "\n", encoding="utf-8")
    return target


# ------------------------------------------------------------------------------------------------- runs
def child(dataset: str, method: str, workdir: Path, budget: str, extra: dict) -> None:
    """One training run in this (fresh) process; prints one JSON line."""
    import peftkit.train.trainer as trainer
    from peftkit.train.config import validate

    epochs, size = BUDGETS[budget][dataset]
    values = {**COMMON, **prepare(dataset, workdir, size), **METHODS[method], **extra,
              "epochs": epochs, "output_dir": str(workdir / f"{dataset}-{method}")}
    config = validate(values)
    start = time.perf_counter()
    report = trainer.train(config)
    seconds = time.perf_counter() - start
    print(json.dumps({"dataset": dataset, "method": method, "accuracy": report["dev"]["accuracy"],
                      "macro_f1": report["dev"]["macro_f1"], "trainable": report["trainable_parameters"],
                      "share": report["trainable_share"], "seconds": seconds, "peak_rss": common.peak_rss_bytes(),
                      "epochs": values["epochs"], "lr": values["learning_rate"], "train_size": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sst2,banking77,fpb")
    parser.add_argument("--methods", default=ISSUE4_METHODS, help=f"comma-separated, or 'all'; available: {', '.join(METHODS)}")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: sst2 2 epochs of 67k, banking77 6, fpb 6; compare: sst2 1 epoch of 20k, banking77 3, "
                             "fpb 4 (every method in ~2 hours); short: sst2 1 epoch of 8k, banking77 2, fpb 3 (~1.5 hours); quick: 2,000 examples, 1 epoch")
    parser.add_argument("--quick", action="store_true", help="same as --budget quick")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--log", help="also write each result as a JSON line to this file as soon as it is measured")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = "quick" if args.quick else args.budget
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if args.child:
        child(*args.child, Path(args.workdir), budget, json.loads(args.extra))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="peftkit-quality-") as workdir:
        for dataset in args.datasets.split(","):
            for method in methods:
                command = [sys.executable, __file__, "--child", dataset, method, "--workdir", workdir, "--budget", budget]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{dataset}/{method} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(result)
                if args.log:
                    with open(args.log, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(result) + "\n")
                print(f"{dataset:10s} {method:9s} acc {100 * result['accuracy']:.2f}  macro-F1 {100 * result['macro_f1']:.2f}"
                      f"  {result['seconds'] / 60:.1f} min", flush=True)
    rows = [[r["dataset"], r["method"], f"{100 * r['accuracy']:.2f}", f"{100 * r['macro_f1']:.2f}",
             f"{r['trainable']:,} ({100 * r['share']:.2f}%)", f"{r['seconds'] / 60:.1f}", f"{r['peak_rss'] / 1e9:.2f}",
             str(r["epochs"]), f"{r['train_size'] or 'all'}", f"{r['lr']:g}"] for r in results]
    table = common.markdown_table(["dataset", "method", "accuracy %", "macro-F1 %", "trainable params", "train min",
                                   "peak RSS GB", "epochs", "train examples", "lr"], rows)
    print(table)
    if not args.no_append:
        settings = (f"all-MiniLM-L6-v2, pooling auto (mean, the model's sentence-transformers pooling), max_length 64, "
                    f"batch 32, AdamW (weight decay 0.01), warm-up 6% then linear decay, seed 0, fp32, 2 threads; LoRA r=8 "
                    f"alpha=16 dropout 0.1 (q,v = query,value; all = every Linear but the head). Final model evaluated "
                    f"once; sst2 on GLUE dev, banking77 on its test set, fpb on the held-out 20%. Budget: {budget}. "
                    "head: cached features; dora/adalora/lora-all+distill: all-linear, r=8 (AdaLoRA init_r 12 -> target_r 8, "
                    "tinit 10%, tfinal 20% of the run); houlsby/pfeiffer: reduction factor 16; distill: base model as "
                    "teacher on the last hidden state (MSE, alpha 0.3).")
        common.append_results(f"Quality: methods on real data (budget: {budget})", table, settings)


if __name__ == "__main__":
    main()
