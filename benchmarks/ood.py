"""Out-of-scope rejection measured: HINT3's three bots (v2 test sets, real out-of-scope queries) and BANKING77 with a
held-out group of intents, LoRA on the packaged MiniLM (the recipes under examples/).

Each data set is trained once (``examples/intent_hint3.yaml`` / ``examples/intent_banking77.yaml``); then each score
(msp, energy, maxlogit) gets its own threshold, calibrated on the run's dev split for ``--coverage`` of in-scope dev
rows, and is evaluated on the test file: in-scope accuracy (a rejected in-scope query is wrong), out-of-scope recall
and precision, AUROC, and the accuracy over the whole test file with the out-of-scope label as one more class (the
figure the HINT3 paper reports per platform).

The HINT3 paper's platform results are on the v1 test files (v2, Feb 2021, corrected test labels and Powerplay11's
train labels). So each bot's run is also scored on its v1 test file (a v1 intent the v2 train set lacks counts as
out of scope), next to the platforms' figures at their 0.1 confidence threshold, Full training sets, as published
in the authors' repository (``results/{platform}_{bot}.csv`` of github.com/hellohaptik/HINT3 at 99965c8, computed
by its ``run_evaluation.ipynb``: accuracy over the whole test file with out-of-scope as a class, in-scope accuracy,
out-of-scope recall). The protocols differ: the platforms' threshold is fixed at 0.1, ours is calibrated on a dev
split carved from train; SOFMattress's v1 and v2 train files are identical, the other two differ slightly.

    python benchmarks/ood.py                      # everything (about an hour on 2 CPU cores; more for BANKING77)
    python benchmarks/ood.py --datasets sofmattress --max_steps 3 --test_limit 60 --no-append   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline environment first)

ROOT = Path(__file__).resolve().parents[1]
HINT3 = ROOT.parent / "shared" / "data" / "hint3" / "v2"
HINT3_V1_TEST = HINT3.parent / "v1" / "test"
# Arora et al. 2020 (HINT3), the authors' results files (v1 test, Full train, threshold 0.1):
# accuracy with out-of-scope as a class, in-scope accuracy, out-of-scope recall
PUBLISHED = {
    "sofmattress": {"Rasa": (.4030, .6926, .0000), "Dialogflow": (.6499, .7316, .5361), "LUIS": (.6599, .5931, .7530),
                    "Haptik": (.5088, .7229, .2108), "BERT": (.4282, .7359, .0000)},
    "curekart": {"Rasa": (.3835, .8407, .0000), "Dialogflow": (.6418, .7500, .5510), "LUIS": (.4521, .7257, .2226),
                 "Haptik": (.4309, .8031, .1187), "BERT": (.3814, .8363, .0000)},
    "powerplay11": {"Rasa": (.1373, .4909, .0000), "Dialogflow": (.3499, .5964, .2542), "LUIS": (.5331, .4800, .5537),
                    "Haptik": (.2635, .6655, .1073), "BERT": (.1658, .5855, .0028)},
}
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
    # with --workdir, a finished run is reused and an interrupted one resumes
    settings = {**config.model_dump(mode="json"), "data": {k: common.file_digest(Path(getattr(config, k))) for k in
                                                          ("train_file", "dev_file") if getattr(config, k)}}
    seconds = common.timed_once(Path(config.output_dir), lambda resume: train(config, resume=resume), settings)
    run = Run(config.output_dir)
    datasets = run.task.load_datasets(config)  # the same seeded dev split as in training
    dev_logits = run.logits(datasets.dev)
    test = run.read_file(config.test_file, labelled=True)
    test_targets = run.task.targets(test, run.vocabulary, config.test_file)
    test_logits = run.logits(test)
    tests = [(name, test_logits, test_targets)]
    if name in BOTS and not args.test_limit:
        v1_file = HINT3_V1_TEST / f"{name}_test.csv"
        v1 = run.read_file(v1_file, labelled=True)  # an intent unseen in training reads as out of scope
        tests.append((f"{name} (v1 test)", run.logits(v1), run.task.targets(v1, run.vocabulary, str(v1_file))))
    rows = []
    for method in METHODS:
        rule = ood.OodRule(method, config.ood.label)
        ood.calibrate(rule, dev_logits, torch.ones(len(datasets.dev), dtype=torch.bool), {"coverage": args.coverage})
        for label, logits, targets in tests:
            result = ood.metrics(logits, targets, rule)
            rows.append({"dataset": label, "score": method, "train_seconds": seconds, **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def published_table(rows: list[dict]) -> str:
    lines = ["| bot (v1 test) | system | threshold | accuracy (all rows) | in-scope acc. | OOS recall |", "|" + " --- |" * 6]
    for bot, platforms in PUBLISHED.items():
        for row in rows:
            if row["dataset"] == f"{bot} (v1 test)":
                lines.append(f"| {bot} | peftkit LoRA, {row['score']} | {row['threshold']:.4f} (calibrated) | "
                             f"{row['overall_accuracy']:.4f} | {row['in_scope_accuracy']:.4f} | {row['out_of_scope_recall']:.4f} |")
        for platform, (acc, inside, recall) in platforms.items():
            lines.append(f"| {bot} | {platform} (published) | 0.1 | {acc:.4f} | {inside:.4f} | {recall:.4f} |")
    return "\n".join(lines)


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
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder); "
                        "run again with the same folder, finished runs are reused and an interrupted one resumes")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append it to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [row for name in args.datasets.split(",") for row in measure(name.strip(), args, workdir)]
    text = table([r for r in rows if "(v1 test)" not in r["dataset"]])
    if any("(v1 test)" in r["dataset"] for r in rows):
        text += "\n\nThe HINT3 paper's platforms on the same (v1) test files:\n\n" + published_table(rows)
    print(text)
    if not args.no_append:
        seconds = ", ".join(sorted({f"{r['dataset']} {r['train_seconds']:.0f} s" for r in rows if "(v1" not in r["dataset"]}))
        notes = (f"LoRA r=16 all-linear on the packaged MiniLM (examples/intent_hint3.yaml, examples/intent_banking77.yaml); "
                 f"each score's threshold keeps {args.coverage:.0%} of the in-scope rows of the run's dev split (carved "
                 f"from train). Train time ({args.threads} thread(s)): {seconds}. Published figures: Arora et al. 2020, "
                 "HINT3, from the authors' results files (github.com/hellohaptik/HINT3 results/, commit 99965c8), "
                 "Full train sets, v1 test files, confidence threshold 0.1.")
        common.append_results("Out-of-scope rejection: HINT3 (real out-of-scope queries) and BANKING77 held-out intents",
                              text, notes)


if __name__ == "__main__":
    main()
