"""The README's screenshots of `peftkit ui`, taken with the browser tests' Playwright setup (Debian's chromium) over a
folder of real runs:

    PYTHONPATH=. python tests/ui_screenshots.py --runs /work/ui-runs/runs --out docs \
        --run banking77-lora-r8 --compare banking77-lora-r8 banking77-lora-r8-qv banking77-head --ner wnut17-lora

writes ui-runs.png (the runs table), ui-run.png (a run: curves, per-class table), ui-compare.png and ui-ner.png
(per entity type table and heatmap), each a palette PNG (small enough for the repository).

The runs of the README's screenshots (2026-11-29, 2 busy CPU cores, one thread each; R=/work/ui-runs/runs):

    B77="--model minilm --train_file ../shared/data/banking77/train.csv --text_column text --label_column category \
         --max_length 64 --batch_size 32 --max_steps 120 --eval_strategy steps --eval_steps 30 --num_threads 1 --seed 0"
    peftkit train $B77 --method lora --lora.r 8 --learning_rate 2e-3 --output_dir $R/banking77-lora-r8
    peftkit train $B77 --method lora --lora.r 8 --lora.target_modules '[query, value]' --learning_rate 2e-3 \
        --output_dir $R/banking77-lora-r8-qv
    peftkit train $B77 --method head --learning_rate 5e-3 --output_dir $R/banking77-head
    # WNUT-17: the first 1,200 training sentences that hold an entity (150 steps on the whole file tag everything O)
    peftkit train --task token-classification --model minilm --method lora --lora.r 16 --lora.alpha 32 \
        --lora.target_modules all-linear --train_file wnut17_train_with_entities.conll \
        --dev_file ../shared/data/wnut17/emerging.dev.conll --max_length 64 --batch_size 16 --max_steps 150 \
        --learning_rate 2e-3 --eval_strategy steps --eval_steps 50 --num_threads 1 --seed 0 --output_dir $R/wnut17-lora
    # SmolLM2: 400 Bitext rows shuffled with seed 0 (instruction, response)
    peftkit train --task causal-lm --model smollm2 --method lora --lora.r 16 --lora.alpha 32 \
        --lora.target_modules all-linear --train_file bitext_400.csv --prompt_column instruction \
        --completion_column response --dev_split 0.05 --max_length 96 --max_steps 16 --batch_size 4 \
        --eval_batch_size 8 --learning_rate 1e-3 --eval_strategy steps --eval_steps 8 --eval_generations 3 \
        --max_new_tokens 32 --num_threads 1 --seed 0 --output_dir $R/bitext-smollm2-lora
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_fixtures import UiProcess, browser_or_fail  # noqa: E402

WIDTH = 1280


def shot(page, path: Path, top: str | None = None, bottom: str | None = None, height: int = 820) -> None:
    """The page from element ``top`` (default: the page's top) to the end of ``bottom`` (default: ``height`` px)."""
    y0 = page.locator(top).first.bounding_box()["y"] - 12 if top else 0
    y1 = (lambda box: box["y"] + box["height"] + 12)(page.locator(bottom).first.bounding_box()) if bottom else y0 + height
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": y0, "width": WIDTH, "height": y1 - y0})
    small(path)


def small(path: Path) -> None:
    """Re-save as a 256-colour PNG: the pages are flat colours and text, so this keeps them sharp at a third of
    the size."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--run", required=True, help="the run whose page is shown")
    parser.add_argument("--compare", nargs="+", required=True, help="two or more runs to compare")
    parser.add_argument("--ner", help="a token-classification run (its per-type table and heatmap)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    ui = UiProcess(args.runs)
    try:
        with sync_playwright() as playwright:
            browser = browser_or_fail(playwright)
            page = browser.new_page(viewport={"width": WIDTH, "height": 800})
            page.goto(ui.url + "/")
            shot(page, args.out / "ui-runs.png", bottom="#runs-form")
            page.goto(ui.url + "/run?" + urllib.parse.urlencode({"p": args.run}))
            shot(page, args.out / "ui-run.png", height=900)
            page.goto(ui.url + "/")
            for run in args.compare:
                page.check(f'input[value="{run}"]')
            page.click("text=compare selected")
            page.wait_for_selector("#compare-metrics")
            shot(page, args.out / "ui-compare.png", bottom="#compare-metrics")
            if args.ner:
                page.goto(ui.url + "/run?" + urllib.parse.urlencode({"p": args.ner}))
                shot(page, args.out / "ui-ner.png", bottom="#confusion-dev")
            browser.close()
    finally:
        ui.stop()
    for path in sorted(args.out.glob("ui-*.png")):
        print(f"{path}: {path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
