"""Instruction-tuning quality on the Bitext customer-support data: LoRA vs full fine-tuning of SmolLM2 at one budget.

    python benchmarks/llm_quality.py                       # LoRA all-linear r=16 and full, 60 steps each (~25 min idle)
    python benchmarks/llm_quality.py --steps 8 --no-append # a smoke run

Each method trains with ``peftkit train`` in a fresh process on the same data, order and steps (only the learning
rate differs: 1e-3 for LoRA, 5e-5 for full fine-tuning), on ``model: smollm2`` (SmolLM2-135M-Instruct, a 4-bit GGUF
dequantized to fp32). The run's own end-of-training evaluation gives every number: dev loss and perplexity of the
base model (adapters off) and of the trained model on the same held-out conversations, and greedy answers to a
seeded sample of dev prompts by both, scored against the references with ROUGE-L (``rouge-score``) and BLEU
(``sacrebleu``). The data (../shared/data/bitext_customer_support, CDLA-Sharing-1.0) is read in place.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bitext_customer_support" / \
    "Bitext_Sample_Customer_Support_Training_Dataset.csv"
COMMON = {"model": "smollm2", "task": "causal-lm", "prompt_column": "instruction", "completion_column": "response",
          "dev_split": 0.01, "max_length": 192, "batch_size": 8, "eval_batch_size": 16, "eval_strategy": "no",
          "eval_generations": 24, "max_new_tokens": 96, "warmup_ratio": 0.1, "seed": 0, "quiet": True}
METHODS = {
    "lora-all": {"method": "lora", "learning_rate": 1e-3,
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
    "full": {"method": "full", "learning_rate": 5e-5},
}


def run(method: str, steps: int, workdir: Path) -> dict:
    folder = workdir / method
    config = {**COMMON, **METHODS[method], "train_file": str(DATA), "max_steps": steps, "output_dir": str(folder)}
    path = workdir / f"{method}.json"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(path)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return {"method": method, "seconds": seconds, "report": report, "stdout": done.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--methods", default="lora-all,full")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: the shared data folder must sit next to the repository")
    results = []
    with tempfile.TemporaryDirectory(prefix="peftkit-llm-quality-") as workdir:
        for method in args.methods.split(","):
            result = run(method, args.steps, Path(workdir))
            results.append(result)
            print(result["stdout"][-2500:], flush=True)
    rows = []
    for r in results:
        rep, gen = r["report"], r["report"].get("generation", {})
        base_dev, dev = rep["base_dev"], rep["dev"]
        rows.append([r["method"], f"{rep['trainable_parameters']:,} ({100 * rep['trainable_share']:.2f}%)",
                     f"{base_dev['loss']:.3f} → {dev['loss']:.3f}", f"{base_dev['perplexity']:.2f} → {dev['perplexity']:.2f}",
                     f"{gen['base']['rougeL']:.3f} → {gen['adapted']['rougeL']:.3f}",
                     f"{gen['base']['bleu']:.1f} → {gen['adapted']['bleu']:.1f}", f"{r['seconds'] / 60:.1f}"])
    table = common.markdown_table(["method", "trainable params", "dev loss (base → tuned)", "dev perplexity",
                                   "ROUGE-L", "BLEU", "wall min (incl. evaluation)"], rows)
    print(table)
    if not args.no_append:
        first = results[0]["report"]
        notes = (f"SmolLM2-135M-Instruct (model: smollm2), Bitext customer support (4,514 pairs; 1% held out as dev: "
                 f"{first['dev'].get('tokens', '?')} assistant tokens), {args.steps} steps of batch "
                 f"{COMMON['batch_size']}, max_length {COMMON['max_length']} (longer answers cut), loss on the assistant "
                 f"tokens only, AdamW, warm-up 10% then linear decay, seed 0, fp32, 2 threads. LoRA all-linear r=16 "
                 f"alpha 32 dropout 0.05 at lr 1e-3; full fine-tuning at lr 5e-5. ROUGE-L (F, 0-1) and BLEU (0-100) "
                 f"of greedy answers (up to {COMMON['max_new_tokens']} new tokens) to {COMMON['eval_generations']} "
                 f"seeded dev prompts against the reference answers; base = the same model with adapters off. "
                 + args.note)
        common.append_results("Causal LM quality: Bitext customer support, LoRA vs full fine-tuning", table, notes)


if __name__ == "__main__":
    main()
