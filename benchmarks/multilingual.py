"""Financial sentiment in Chinese and English on two packaged bases: all-MiniLM-L6-v2 (English vocabulary) and
Gemma-3-270m (multilingual), LoRA on every linear layer.

    python benchmarks/multilingual.py                          # full budget (CPU: many hours; the Gemma runs dominate)
    python benchmarks/multilingual.py --budget short           # FinFE 1 epoch, FPB 2 epochs
    python benchmarks/multilingual.py --budget cpu             # FinFE 1 epoch of 3,200 posts, FPB 1 epoch
    python benchmarks/multilingual.py --budget smoke           # 16 training examples, 16 scored: checks the plumbing
    python benchmarks/multilingual.py --datasets finfe --bases gemma3-270m --append   # add the table to RESULTS.md
    python benchmarks/multilingual.py --budget cpu --threads 1 --log ml.jsonl &       # twice: the runs are split
    python benchmarks/multilingual.py --budget cpu --log ml.jsonl --append            # then the table from the log

Datasets (read from ../shared/data, never copied into the repository):
- finfe: FinFE (BBT-FinCUGE, Chinese financial social-media posts, negative / neutral / positive), cleaned by
  ``examples/finfe_to_csv.py`` (malformed labels, repeats, conflicting labels and train copies of dev/test texts
  dropped): 10,490 train / 1,331 dev / 1,328 test; the final model is scored on test;
- fpb: Financial PhraseBank Sentences_50Agree, the fixed seeded stratified 80/20 split of ``quality.py`` (the same
  files, so the MiniLM row compares with the quality table); scored on the held-out 20%.

Each run trains with ``peftkit train`` in a fresh process; no checkpoint is picked on the scored split. ``unk %`` is
the share of the training texts' tokens that the base's tokenizer maps to its unknown token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

COMMON = {"pooling": "auto", "max_length": 64, "batch_size": 32, "warmup_ratio": 0.06, "lr_scheduler": "linear",
          "eval_strategy": "no", "seed": 0, "quiet": True, "num_threads": 2, "method": "lora",
          "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}}
BASES = {  # pooling auto: MiniLM's mean pooling; Gemma's last non-padding token (Gemma3TextForSequenceClassification)
    "minilm": {"model": "minilm", "learning_rate": 1e-3},
    "gemma3-270m": {"model": "gemma3-270m", "learning_rate": 5e-4},
}
BUDGETS = {  # dataset -> (epochs, training examples, evaluated examples); None = all
    "full": {"finfe": (3, None, None), "fpb": (6, None, None)},
    "short": {"finfe": (1, None, None), "fpb": (2, None, None)},
    # sized for 2 CPU cores (Gemma steps take seconds each): a seeded 3,200-post subset of FinFE's training set
    "cpu": {"finfe": (1, 3200, None), "fpb": (1, None, None)},
    "smoke": {"finfe": (1, 16, 16), "fpb": (1, 16, 16)},
}


def prepare(dataset: str, workdir: Path) -> tuple[dict, str]:
    """Config keys for the dataset's CSV files (written under ``workdir``), and the split that is scored."""
    if dataset == "fpb":
        return quality.prepare("fpb", workdir, None), "dev"
    if dataset != "finfe":
        raise SystemExit(f"unknown dataset {dataset!r} (finfe, fpb)")
    spec = importlib.util.spec_from_file_location("finfe_to_csv", ROOT / "examples" / "finfe_to_csv.py")
    finfe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finfe)
    splits, _ = finfe.convert(DATA / "fincuge_finfe")
    keys = {}
    for name, rows in splits.items():
        path = workdir / f"finfe_{name}.csv"
        finfe.write_csv(path, rows)
        keys[f"{name}_file"] = str(path)
    return {**keys, "text_column": "text", "label_column": "label"}, "test"


def head(source: str, target: Path, count: int | None) -> str:
    """The first ``count`` rows of a CSV file (a seeded shuffle first: the files may be sorted by label)."""
    if not count:
        return source
    quality._subset(Path(source), target, count)
    return str(target)


def unknown_share(model_path: str, csv_file: str) -> float:
    import csv

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with open(csv_file, encoding="utf-8", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    ids = [i for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in encoded]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))


def logged(log: str | None, budget: str, dataset: str, base: str) -> list[dict]:
    """Results of this budget, dataset and base already in the log."""
    if not log or not Path(log).exists():
        return []
    rows = [json.loads(line) for line in Path(log).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("budget") == budget and r["dataset"] == dataset and r["base"] == base]


def child(dataset: str, base: str, workdir: Path, budget: str, threads: int) -> None:
    """One training run in this (fresh) process; prints one JSON line."""
    import peftkit.train.trainer as trainer
    from peftkit.train.config import validate
    from peftkit.train.setup import resolve_model

    epochs, train_size, eval_size = BUDGETS[budget][dataset]
    keys, scored = prepare(dataset, workdir)
    keys["train_file"] = head(keys["train_file"], workdir / f"{dataset}_train_{train_size}.csv", train_size)
    for split in ("dev", "test"):
        if f"{split}_file" in keys:
            keys[f"{split}_file"] = head(keys[f"{split}_file"], workdir / f"{dataset}_{split}_{eval_size}.csv", eval_size)
    values = {**COMMON, **keys, **BASES[base], "epochs": epochs, "output_dir": str(workdir / f"{dataset}-{base}"),
              "num_threads": threads}
    config = validate(values)
    unk = unknown_share(resolve_model(config.model), keys["train_file"])  # also converts gemma3-270m on first use
    start = time.perf_counter()
    report = trainer.train(config)
    seconds = time.perf_counter() - start
    print(json.dumps({"dataset": dataset, "base": base, "scored": scored, "accuracy": report[scored]["accuracy"],
                      "macro_f1": report[scored]["macro_f1"], "seconds": seconds, "unk": unk,
                      "trainable": report["trainable_parameters"], "share": report["trainable_share"],
                      "peak_rss": common.peak_rss_bytes(), "epochs": epochs, "lr": values["learning_rate"],
                      "train_size": train_size, "eval_size": eval_size, "budget": budget, "threads": threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="finfe,fpb")
    parser.add_argument("--bases", default=",".join(BASES), help=f"comma-separated: {', '.join(BASES)}")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--append", action="store_true", help="add the table to benchmarks/RESULTS.md")
    parser.add_argument("--log", help="write each result as a JSON line to this file as soon as it is measured; runs "
                        "already logged for this budget are reused, and several processes sharing the log split the runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, Path(args.workdir), args.budget, args.threads)
        return
    unlogged: list[dict] = []
    wanted = [(d, b) for d in args.datasets.split(",") for b in args.bases.split(",")]
    with tempfile.TemporaryDirectory(prefix="peftkit-multilingual-") as workdir:
        for dataset, base in wanted:
            if logged(args.log, args.budget, dataset, base) or not common.claim(args.log, f"{dataset}-{base}", args.budget):
                continue
            command = [sys.executable, __file__, "--child", dataset, base, "--workdir", workdir,
                       "--budget", args.budget, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{dataset}/{base} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if args.log:
                common.record(args.log, result)
                common.release(args.log, f"{dataset}-{base}", args.budget)
            else:
                unlogged.append(result)
            print(f"{dataset:6s} {base:12s} acc {100 * result['accuracy']:.2f}  macro-F1 "
                  f"{100 * result['macro_f1']:.2f}  {result['seconds'] / 60:.1f} min", flush=True)
    results = unlogged + [r for d, b in wanted for r in logged(args.log, args.budget, d, b)[:1]]
    missing = [f"{d}/{b}" for d, b in wanted if not any(r["dataset"] == d and r["base"] == b for r in results)]
    if missing:  # another process still runs them
        print(f"not in the table yet (running elsewhere): {', '.join(missing)}")
    rows = [[r["dataset"], r["base"], f"{100 * r['accuracy']:.2f}", f"{100 * r['macro_f1']:.2f}",
             f"{r['seconds'] / 60:.1f}", f"{100 * r['unk']:.1f}", f"{r['trainable']:,} ({100 * r['share']:.2f}%)",
             f"{r['peak_rss'] / 1e9:.2f}", str(r["epochs"]), f"{r['train_size'] or 'all'}", r["scored"],
             f"{r['lr']:g}"] for r in results]
    table = common.markdown_table(["dataset", "base", "accuracy %", "macro-F1 %", "train min", "unk %",
                                   "trainable params", "peak RSS GB", "epochs", "train examples", "scored on", "lr"],
                                  rows)
    print(table)
    if args.append:
        common.append_results(f"Multilingual: financial sentiment, MiniLM vs Gemma-3-270m (budget: {args.budget})",
                              table, "LoRA all-linear r=8 alpha=16 dropout 0.1, pooling auto (MiniLM: mean; Gemma: "
                              "last non-padding token), max_length 64, batch 32, AdamW, warm-up 6% then linear decay, "
                              f"seed 0, fp32, {'/'.join(sorted({str(r.get('threads', 2)) for r in results}))} thread(s) per run. FinFE scored on its cleaned test set, FPB on quality.py's "
                              "held-out 20%. Final model evaluated once.")


if __name__ == "__main__":
    main()
