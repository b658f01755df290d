"""The library API without the CLI: LoRA on the packaged MiniLM over the demo intents, in a plain PyTorch loop.

    python examples/python_api.py [--epochs 4] [--out demo_output/adapter]

Prints test accuracy before and after, the trainable share, saves the adapter (PEFT format) and reloads it.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import peftkit  # noqa: E402
from peftkit.tasks.demo import minilm_path, read_intents  # noqa: E402


def accuracy(model, tokenizer, texts, labels, label2id, batch_size=64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1)
            correct += sum(int(p) == label2id[l] for p, l in zip(predicted, labels[start:start + batch_size]))
    return correct / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="demo_output/adapter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    train_texts, train_labels = read_intents("train")
    test_texts, test_labels = read_intents("test")
    labels = sorted(set(train_labels))
    label2id = {l: i for i, l in enumerate(labels)}
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    print(f"data: {len(train_texts)} train / {len(test_texts)} test messages, {len(labels)} intents")
    before = accuracy(model, tokenizer, test_texts, test_labels, label2id)

    config = peftkit.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear")
    adapted = peftkit.adapt(model, config)
    print(f"LoRA r=8 on all linear layers of all-MiniLM-L6-v2 (+ the new classifier head): {adapted.trainable_parameters()}")

    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    batch_size = 16
    steps = args.epochs * ((len(train_texts) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        adapted.train()
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch = tokenizer([train_texts[j] for j in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = adapted(**batch, labels=torch.tensor([label2id[train_labels[j]] for j in idx])).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(order):.4f} ({time.time() - start:.0f}s)")
    after = accuracy(adapted, tokenizer, test_texts, test_labels, label2id)
    print(f"test accuracy before LoRA: {before:.1%}   after LoRA: {after:.1%}")

    adapted.save_adapter(args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    reloaded = peftkit.load_adapter(fresh, args.out)
    again = accuracy(reloaded, tokenizer, test_texts, test_labels, label2id)
    print(f"adapter saved to {args.out} ({size / 1e6:.2f} MB, Hugging Face PEFT format); reloaded accuracy: {again:.1%}")


if __name__ == "__main__":
    main()
