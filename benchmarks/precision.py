"""Does the bf16 training path cost accuracy? LoRA on SST-2, fp32 vs bf16, same seed, same data order.

    python benchmarks/precision.py                    # 20,000 training sentences, 1 epoch, ~10 minutes on 2 cores
    python benchmarks/precision.py --train 4000 --no-append   # a quick look

Each run: the packaged all-MiniLM-L6-v2, LoRA all-linear r=8 alpha=16 dropout 0.1 (+ the new classifier head),
AdamW lr 5e-4, warm-up 6% then linear decay, batch 32, max 64 tokens; accuracy on the 872 GLUE dev sentences.
"bf16" is the frozen base cast to bf16 (``AdaptedModel.cast_frozen``) with fp32 master adapter weights, trained
under ``torch.autocast(bfloat16)``; "bf16 + fast" adds ``peftkit.fast_training``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def read(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows], [int(r["label"]) for r in rows]


def batches(tokenizer, texts, labels, size, order):
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        yield enc, torch.tensor([labels[i] for i in idx])


def run(mode: str, train, dev, args) -> dict:
    import peftkit
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    path = common.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = peftkit.adapt(model, peftkit.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear"))
    if mode.startswith("bf16"):
        model.cast_frozen(torch.bfloat16)
    if mode.endswith("fast"):
        peftkit.fast_training(model)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode.startswith("bf16") else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    texts, labels = train
    # the same shuffled order for every mode; batches of similar length make padding cheap
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    chunks = [sorted(order[i:i + 32 * 50], key=lambda j: len(texts[j])) for i in range(0, len(order), 32 * 50)]
    batch_order = [c[i:i + 32] for c in chunks for i in range(0, len(c), 32)]
    random.Random(args.seed + 1).shuffle(batch_order)
    total = len(batch_order)
    warmup = max(1, int(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / max(1, total - warmup)))
    model.train()
    start = time.perf_counter()
    for idx in batch_order:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with autocast():
            loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    predictions = []
    dev_texts, dev_labels = dev
    with torch.no_grad():
        for enc, _ in batches(tokenizer, dev_texts, dev_labels, 64, list(range(len(dev_texts)))):
            with autocast():
                predictions += model(**enc).logits.argmax(-1).tolist()
    accuracy = sum(p == y for p, y in zip(predictions, dev_labels)) / len(dev_labels)
    return {"mode": mode, "accuracy": accuracy, "train_seconds": seconds, "predictions": predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20000, help="training sentences (first N of a seeded shuffle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="fp32,bf16,bf16+fast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit.ops.memory import keep_freed_memory

    keep_freed_memory()
    texts, labels = read(DATA / "train.tsv")
    order = list(range(len(texts)))
    random.Random(1234).shuffle(order)
    order = order[: args.train]
    train = ([texts[i] for i in order], [labels[i] for i in order])
    dev = read(DATA / "dev.tsv")
    results = [run(mode, train, dev, args) for mode in args.modes.split(",")]
    base = results[0]
    rows = [[r["mode"], f"{100 * r['accuracy']:.2f}", f"{100 * (r['accuracy'] - base['accuracy']):+.2f}",
             str(sum(a != b for a, b in zip(r["predictions"], base["predictions"]))),
             f"{r['train_seconds']:.0f}", f"{r['train_seconds'] / base['train_seconds']:.2f}"] for r in results]
    table = common.markdown_table(["precision", "SST-2 dev accuracy %", "vs fp32 (points)",
                                   "dev predictions that differ from fp32", "train s", "time vs fp32"], rows)
    print(table)
    if not args.no_append:
        common.append_results(
            "bf16 training path vs fp32: SST-2 accuracy", table,
            f"LoRA all-linear r=8 on all-MiniLM-L6-v2, {args.train} training sentences, 1 epoch, batch 32, seed {args.seed}; "
            "dev = the 872 GLUE SST-2 dev sentences (one sentence = 0.11 points).")


if __name__ == "__main__":
    main()
