"""The folder ``peftkit merge`` writes for a classification run, and what it says about itself.

Two layouts, depending on the run's pooling:

- ``pooler`` (the model's own ``...ForSequenceClassification`` head, e.g. BERT's pooler + classifier): a standard
  transformers folder; ``AutoModelForSequenceClassification.from_pretrained`` alone gives the run's predictions.
- ``cls`` / ``mean``: no transformers class classifies that way, so the folder holds the encoder (a transformers
  folder for ``AutoModel``), the linear head in ``classifier.safetensors`` and the pooling in ``1_Pooling/config.json``.

Both also hold the tokenizer, ``peftkit_head.json`` (labels, pooling and the run's text settings, read back by
``peftkit predict/eval --run`` and ``peftkit serve --base``) and a README.md saying exactly what is there.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import MERGED_MARKER as MARKER
from . import data as D

# run settings a merged folder carries, so that predict/eval read texts the way the run did
CARRIED = ("method", "max_length", "text_column", "text_pair_column", "label_column")


def write(folder: Path, plain: nn.Module, labels: list[str], config, run_path: Path, tokenizer) -> dict:
    """Fill ``folder`` (empty, about to be renamed into place) with the merged model ``plain``; returns the
    marker, which the caller writes to ``MARKER``."""
    from .heads import PooledForSequenceClassification

    plain.config.id2label = dict(enumerate(labels))
    plain.config.label2id = {name: i for i, name in enumerate(labels)}
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pooled = isinstance(plain, PooledForSequenceClassification)
    marker = {"format": "encoder + pooling + linear head" if pooled else "AutoModelForSequenceClassification",
              "pooling": plain.pooling if pooled else "pooler", "labels": labels, "base_model": config.model,
              "merged_from": str(run_path), **{key: getattr(config, key) for key in CARRIED}}
    (folder / "README.md").write_text(_readme(marker, plain, pooled), encoding="utf-8")
    return marker


def open_folder(marker: dict) -> tuple[dict, D.LabelMap]:
    """(run config values, labels) of a merged folder, from its marker."""
    carried = {key: marker[key] for key in CARRIED if key in marker}
    return {"pooling": marker["pooling"], **carried}, D.LabelMap(marker["labels"])


def model(folder: Path, pooling: str, labels: D.LabelMap) -> nn.Module:
    """The merged classifier, read whole from the folder (its own trained head)."""
    from .heads import build_classifier

    built = build_classifier(folder, None, pooling).eval()
    outputs = built.num_labels if hasattr(built, "num_labels") else built.config.num_labels
    if outputs != len(labels):
        raise D.DataError(f"{folder}: the model has {outputs} outputs but {MARKER} lists {len(labels)} labels; "
                          "merge the run again")
    return built


def _readme(marker: dict, plain: nn.Module, pooled: bool) -> str:
    arch = type(plain.encoder if pooled else plain).__name__
    n, hidden = len(marker["labels"]), plain.config.hidden_size
    head = (f"Merged from the peftkit run `{marker['merged_from']}` (method `{marker['method']}`, base model "
            f"`{marker['base_model']}`): the trained weights, any adapter folded into them; nothing here needs "
            "peftkit.\n")
    common = ("- tokenizer files: `AutoTokenizer.from_pretrained(this folder)`; the run truncated texts to "
              f"{marker['max_length']} tokens.\n"
              f"- `{MARKER}`: labels, pooling and the run's text settings (read by `peftkit predict/eval "
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
