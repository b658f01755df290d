"""Recommendation by ranking on MovieLens: LoRA and head-only cross-encoders against two baselines (the most
popular items; the untuned base model's embedding cosine similarity), NDCG@10 / HR@10 / MRR on the held-out
interactions (each user's last k ratings by time; see examples/recsys_movielens/prepare.py).

    python benchmarks/ranking.py --data runs/movielens_data --out runs/ranking_bench
    python benchmarks/ranking.py --data runs/movielens_data --out /tmp/rank_smoke --max_queries 8 --max_steps 2

Prints a markdown table (and writes results.json in --out). A finished run already in --out is reused and an
interrupted one resumes from its checkpoint (its "train s" is then the time of the last part only). Research use only
(MovieLens licence).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _groups(path: Path, limit: int | None):
    from peftkit.tasks.ranking_data import RankColumns, read_groups

    groups = read_groups(path, RankColumns())
    return groups[:limit] if limit else groups


def popularity(data: Path, groups) -> dict:
    from peftkit.tasks.ranking_metrics import mean_metrics

    counts = json.loads((data / "popularity.json").read_text(encoding="utf-8"))
    return mean_metrics([[float(counts.get(i, 0)) for i in g.items] for g in groups], [g.labels for g in groups])


def cosine(model: str, groups, max_length: int, batch: int = 64) -> dict:
    """The untuned base model: mean-pooled embeddings of the query and of each item, cosine similarity."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from peftkit.tasks.ranking_metrics import mean_metrics
    from peftkit.train.setup import resolve_model

    path = resolve_model(model)
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    cache: dict[str, torch.Tensor] = {}

    def embed(texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            inputs = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            cache.update(zip(chunk, vectors))

    embed([g.query for g in groups] + [i for g in groups for i in g.items])
    scores = [[float(cache[g.query] @ cache[i]) for i in g.items] for g in groups]
    return mean_metrics(scores, [g.labels for g in groups])


def tuned(method: str, args, test: Path) -> dict:
    from peftkit.atomic import write_json
    from peftkit.train.config import load
    from peftkit.train.run import Run
    from peftkit.train.trainer import train

    out = Path(args.out) / method
    overrides = ["--task", "ranking", "--model", args.model, "--method", method, "--train_file",
                 str(args.data / "train.jsonl"), "--dev_file", str(args.data / "dev.jsonl"), "--output_dir", str(out),
                 "--max_length", str(args.max_length), "--batch_size", "8", "--eval_batch_size", "4", "--quiet", "true",
                 "--learning_rate", str(args.lr[method]), "--epochs", str(args.epochs),
                 "--save_steps", str(args.save_steps)]
    if args.max_steps:
        overrides += ["--max_steps", str(args.max_steps)]
    # a finished run in --out is reused; an interrupted one resumes from its checkpoint. The thread count changes
    # how fast a run trains, not what it learns: it is not part of the run's identity
    settings = {"overrides": overrides,
                "data": {n: common.file_digest(args.data / n) for n in ("train.jsonl", "dev.jsonl")}}
    threads = ["--num_threads", str(args.threads)]
    seconds = common.timed_once(out, lambda resume: train(load(None, overrides + threads), resume=resume), settings)
    # the test scores of a finished run are kept beside it, keyed by the test file (scoring takes minutes)
    scored, digest = out / "benchmark_test_result.json", common.file_digest(test)
    if scored.exists() and json.loads(scored.read_text()).get("test_sha256") == digest:
        result = json.loads(scored.read_text())["result"]
    else:
        result = {k: v for k, v in Run(out).evaluate(test).items() if k != "report_text"}
        write_json(scored, {"test_sha256": digest, "result": result})
    return {**result, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by prepare.py")
    parser.add_argument("--out", default="runs/ranking_bench")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default="lora,head")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max_steps", type=int, default=None, help="a smoke run")
    parser.add_argument("--max_queries", type=int, default=None, help="only the first N test users (a smoke run)")
    parser.add_argument("--max_length", type=int, default=160, help="as examples/recsys_movielens/config.yaml")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training and scoring)")
    parser.add_argument("--save_steps", type=int, default=50, help="checkpoint every N steps (an interrupted run resumes)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # the baselines and the test scoring run in this process
    args.lr = {"lora": 3e-4, "head": 1e-3, "full": 3e-5}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    groups = _groups(args.data / "test.jsonl", args.max_queries)
    test = Path(args.out) / "test.jsonl"  # the (possibly limited) test set, as the tuned runs read it
    lines = (args.data / "test.jsonl").read_text(encoding="utf-8").splitlines()
    test.write_text("\n".join(lines[:args.max_queries] if args.max_queries else lines) + "\n", encoding="utf-8")
    results = {"most popular": popularity(args.data, groups),
               f"{args.model} cosine (untuned)": cosine(args.model, groups, args.max_length)}
    for method in args.methods.split(","):
        results[f"{method} cross-encoder"] = tuned(method, args, test)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {k: {m: v for m, v in r.items() if m != "report_text"} for k, r in results.items()}, indent=2))
    candidates = sum(len(g.items) for g in groups) / max(1, len(groups))
    print(f"\n{len(groups)} test users, {candidates:.0f} candidates each on average (held-out positives + sampled unseen)\n")
    print("| ranker | NDCG@10 | HR@10 | MRR | train s |\n| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['ndcg_10']:.4f} | {r['hr_10']:.4f} | {r['mrr']:.4f} | {r.get('train_seconds', '')} |")


if __name__ == "__main__":
    main()
