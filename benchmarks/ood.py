"""Out-of-scope rejection measured: HINT3's three bots (v2 test sets, real out-of-scope queries) and BANKING77 with a
held-out group of intents, LoRA on the packaged MiniLM (the recipes under examples/).

Each data set is trained once (``examples/intent_hint3.yaml`` / ``examples/intent_banking77.yaml``); then each score
(msp, energy, maxlogit) gets its own threshold, calibrated on the run's dev split for ``--coverage`` of in-scope dev
rows, and is evaluated on the test file: in-scope accuracy (a rejected in-scope query is wrong), out-of-scope recall
and precision, AUROC, and the accuracy over the whole test file with the out-of-scope label as one more class (the
figure the HINT3 paper reports per platform).

    python benchmarks/ood.py                      # everything (about an hour on 2 CPU cores; more for BANKING77)
    python benchmarks/ood.py --datasets sofmattress --max_steps 3 --test_limit 60 --no-append   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline environment first)

ROOT = Path(__file__).resolve().parents[1]
HINT3 = ROOT.parent / "shared" / "data" / "hint3" / "v2"
BOTS = ("sofmattress", "curekart", "powerplay11")
METHODS = ("msp", "energy", "maxlogit")


def recipe(name: str, workdir: Path) -> tuple[Path, list[str]]:
    """The example config and the overrides that select data set ``name``."""
    if name in BOTS:
        return ROOT / "examples" / "intent_hint3.yaml", [
            "--train_file", str(HINT3 / "train" / f"{name}_train.csv"),
            "--test_file", str(HINT3 / "test" / f"{name}_test.csv")]
    if name == "banking77":
        sys.path.insert(0, str(ROOT / "examples"))
        from banking77_oos import write_train

        write_train(ROOT.parent / "shared" / "data" / "banking77", workdir / "banking77_oos")
        return ROOT / "examples" / "intent_banking77.yaml", ["--train_file", str(workdir / "banking77_oos" / "train.csv")]
    raise SystemExit(f"unknown data set {name!r}; choose from {', '.join((*BOTS, 'banking77'))}")


def head_of(path: Path, rows: int, workdir: Path) -> Path:
    """The first ``rows`` data rows of a CSV file (for smoke runs), written under ``workdir``."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        kept = [next(reader)] + [row for _, row in zip(range(rows), reader)]
    out = workdir / f"head-{path.name}"
    with open(out, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(kept)
    return out


def measure(name: str, args, workdir: Path) -> list[dict]:
    import torch

    from peftkit.tasks import ood
    from peftkit.train.config import load
    from peftkit.train.run import Run
    from peftkit.train.trainer import train

    config_file, overrides = recipe(name, workdir)
    overrides += ["--output_dir", str(workdir / f"run-{name}"), "--quiet", "true", "--num_threads", str(args.threads),
                  "--ood.coverage", str(args.coverage)]
    if args.max_steps:
        overrides += ["--max_steps", str(args.max_steps)]
    config = load(config_file, overrides)
    if args.test_limit:
        config = config.model_copy(update={"test_file": str(head_of(Path(config.test_file), args.test_limit, workdir))})
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    run = Run(config.output_dir)
    datasets = run.task.load_datasets(config)  # the same seeded dev split as in training
    dev_logits = run.logits(datasets.dev)
    test = run.read_file(config.test_file, labelled=True)
    test_targets = run.task.targets(test, run.vocabulary, config.test_file)
    test_logits = run.logits(test)
    rows = []
    for method in METHODS:
        rule = ood.OodRule(method, config.ood.label)
        ood.calibrate(rule, dev_logits, torch.ones(len(datasets.dev), dtype=torch.bool), {"coverage": args.coverage})
        result = ood.metrics(test_logits, test_targets, rule)
        rows.append({"dataset": name, "score": method, "train_seconds": round(seconds, 1), **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = ("in_scope_accuracy", "out_of_scope_recall", "out_of_scope_precision", "auroc", "overall_accuracy")
    lines = ["| data set | score | threshold | in-scope acc. | OOS recall | OOS precision | AUROC | accuracy (all rows) | "
             "in/OOS test rows |", "|" + " --- |" * 9]
    for row in rows:
        cells = [f"{row[key]:.3f}" if row[key] is not None else "-" for key in keys]
        lines.append(f"| {row['dataset']} | {row['score']} | {row['threshold']:.4f} | {' | '.join(cells)} | "
                     f"{row['in_scope_rows']}/{row['out_of_scope_rows']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join((*BOTS, "banking77")))
    parser.add_argument("--coverage", type=float, default=0.95, help="share of in-scope dev rows each threshold keeps")
    parser.add_argument("--max_steps", type=int, default=None, help="smoke runs only")
    parser.add_argument("--test_limit", type=int, default=None, help="first N test rows only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append it to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [row for name in args.datasets.split(",") for row in measure(name.strip(), args, workdir)]
    text = (f"### Out-of-scope rejection (LoRA r16 on MiniLM; thresholds for {args.coverage:.0%} coverage of in-scope "
            f"dev rows)\n\n{table(rows)}\n")
    print(text)
    if not args.no_append:
        with open(common.RESULTS, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
