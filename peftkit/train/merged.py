"""The folder ``peftkit merge`` writes, and what it says about itself.

Two layouts, depending on the run's pooling:

- ``pooler`` (the model's own ``...ForSequenceClassification`` head, e.g. BERT's pooler + classifier): a standard
  transformers folder; ``AutoModelForSequenceClassification.from_pretrained`` alone gives the run's predictions.
- ``cls`` / ``mean``: no transformers class classifies that way, so the folder holds the encoder (a transformers
  folder for ``AutoModel``), the linear head in ``classifier.safetensors`` and the pooling in ``1_Pooling/config.json``.

Both also hold the tokenizer, ``peftkit_head.json`` (labels, pooling and the run's text settings, read back by
``peftkit predict/eval --run`` and ``peftkit serve --base``) and a README.md saying exactly what is there.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

MARKER = "peftkit_head.json"
# run settings a merged folder carries, so that predict/eval read texts the way the run did
CARRIED = ("method", "max_length", "text_column", "text_pair_column", "label_column")


def write(folder: Path, plain: nn.Module, labels: list[str], config, run_path: Path, tokenizer) -> None:
    """Fill ``folder`` (empty, about to be renamed into place) with the merged model ``plain``."""
    from ..heads import PooledForSequenceClassification

    plain.config.id2label = dict(enumerate(labels))
    plain.config.label2id = {name: i for i, name in enumerate(labels)}
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pooled = isinstance(plain, PooledForSequenceClassification)
    marker = {"format": "encoder + pooling + linear head" if pooled else "AutoModelForSequenceClassification",
              "pooling": plain.pooling if pooled else "pooler", "labels": labels, "base_model": config.model,
              "merged_from": str(run_path), **{key: getattr(config, key) for key in CARRIED}}
    (folder / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "README.md").write_text(_readme(marker, plain, pooled), encoding="utf-8")


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text(encoding="utf-8"))


def _readme(marker: dict, plain: nn.Module, pooled: bool) -> str:
    arch = type(plain.encoder if pooled else plain).__name__
    n, hidden = len(marker["labels"]), plain.config.hidden_size
    head = (f"Merged from the peftkit run `{marker['merged_from']}` (method `{marker['method']}`, base model "
            f"`{marker['base_model']}`): the trained weights, any adapter folded into them; nothing here needs "
            "peftkit.\n")
    common = ("- tokenizer files: `AutoTokenizer.from_pretrained(this folder)`; the run truncated texts to "
              f"{marker['max_length']} tokens.\n"
              "- `peftkit_head.json`: labels, pooling and the run's text settings (read by `peftkit predict/eval "
              "--run` and `peftkit serve --base`, where the adapter name `base` uses this head).\n")
    if not pooled:
        return (f"# Merged model: a transformers sequence classifier\n\n{head}\n"
                f"- `config.json` + `model.safetensors`: a standard `{arch}` with its own pooler and classifier "
                f"({n} labels in `id2label`/`label2id`). `AutoModelForSequenceClassification.from_pretrained(this "
                "folder)` and a softmax over its logits give the run's probabilities.\n" + common)
    pool = ("the attention-mask-weighted mean of the last hidden states" if marker["pooling"] == "mean"
            else "the last hidden state of the first token")
    return (f"# Merged model: encoder + {marker['pooling']} pooling + linear head\n\n{head}\n"
            "No transformers class classifies with this pooling, so the model comes in three parts:\n\n"
            f"- `config.json` + `model.safetensors`: the fine-tuned encoder, a plain `{arch}` "
            "(`AutoModel.from_pretrained(this folder)`; labels in `id2label` for reference).\n"
            f"- `1_Pooling/config.json`: the pooling, in sentence-transformers' format: {pool}.\n"
            f"- `classifier.safetensors`: the linear head, `weight` [{n}, {hidden}] and `bias` [{n}].\n" + common
            + "\nProbabilities: `softmax(pooled @ weight.T + bias)`, with `pooled` the pooling above applied to "
            "`AutoModel(...)(**inputs).last_hidden_state`.\n")
