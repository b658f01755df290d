"""Task models with a choice of pooling for the classification head.

transformers' ``...ForSequenceClassification`` classifies the ``pooler`` output (a dense layer + tanh on the first
token). Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained for *mean* pooling and their pooler
was never trained; classifying through it throws information away. ``pooling``:

- ``"pooler"``: the transformers class itself (adapter files then load in Hugging Face PEFT unchanged);
- ``"cls"`` / ``"mean"``: the encoder's last hidden states, first token or attention-masked mean, then dropout and a
  linear classifier (``PooledForSequenceClassification``);
- ``"auto"``: the model's own sentence-transformers pooling (``1_Pooling/config.json``) when it has one, else pooler.

A decoder-only base (GPT-2, LLaMA, Gemma-3: ``model: gemma3-270m``) has no pooler: its transformers class
(``Gemma3TextForSequenceClassification``...) classifies the hidden state of the last token that is not padding (it
looks for the config's ``pad_token_id``, so left and right padding give the same logits). ``"cls"`` is refused for
such a base: under causal attention the first token sees none of the text after it.

A ``PooledForSequenceClassification`` is saved (``peftkit merge``) as the encoder's own transformers folder, the
linear head in ``classifier.safetensors`` and the pooling in ``1_Pooling/config.json``; ``build_classifier`` with
``num_labels=None`` reads such a folder back whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

POOLINGS = ("auto", "pooler", "cls", "mean")
CLASSIFIER_FILE = "classifier.safetensors"
POOLING_CONFIG = Path("1_Pooling") / "config.json"


def resolve_pooling(model_path: str | Path, pooling: str) -> str:
    if pooling != "auto":
        return pooling
    config = Path(model_path) / "1_Pooling" / "config.json"
    if config.is_file():
        modes = json.loads(config.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "pooler"


class PooledForSequenceClassification(nn.Module):
    """encoder -> pooling (cls or masked mean) -> dropout -> linear; forward like a transformers classifier."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float | None = None):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean' here, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        p = dropout if dropout is not None else getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    @property
    def config(self):
        return self.encoder.config

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _encode(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.encoder(**inputs, **kwargs)

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> torch.Tensor:
        """The pooled sentence features (what the classifier sees, before dropout)."""
        out = self._encode(input_ids, attention_mask, token_type_ids, **kwargs)
        return self.pool(out.last_hidden_state, attention_mask)

    def classify(self, features: torch.Tensor, labels: torch.Tensor | None = None, hidden_states=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.dropout(features))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self._encode(input_ids, attention_mask, token_type_ids, **kwargs)
        pooled = self.pool(out.last_hidden_state, attention_mask)
        return self.classify(pooled, labels, getattr(out, "hidden_states", None))

    def save_pretrained(self, path: str | Path) -> None:
        """The encoder as a transformers folder, the head as ``classifier.safetensors`` (``weight`` [labels, hidden],
        ``bias`` [labels]) and the pooling in sentence-transformers' ``1_Pooling/config.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.encoder.save_pretrained(path)
        save_file({k: v.detach().contiguous() for k, v in self.classifier.state_dict().items()}, str(path / CLASSIFIER_FILE))
        (path / POOLING_CONFIG).parent.mkdir(parents=True, exist_ok=True)
        (path / POOLING_CONFIG).write_text(json.dumps({
            "word_embedding_dimension": self.encoder.config.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls", "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))

    def load_head(self, path: str | Path) -> "PooledForSequenceClassification":
        """Load a trained ``classifier.safetensors`` (strict: keys and shapes must match)."""
        from safetensors.torch import load_file

        from ..io import AdapterFileError

        tensors = load_file(str(path))
        hidden = self.encoder.config.hidden_size
        weight = tensors.get("weight")
        if set(tensors) != {"weight", "bias"} or weight is None or weight.ndim != 2 or weight.shape[1] != hidden \
                or tensors["bias"].shape != (weight.shape[0],):
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            raise AdapterFileError(f"{path}: expected weight [labels, {hidden}] and bias [labels], found {shapes}")
        self.classifier = nn.Linear(hidden, weight.shape[0])
        self.classifier.load_state_dict(tensors)
        self.num_labels = weight.shape[0]
        for param in self.classifier.parameters():
            param._is_hf_initialized = True  # marks a trained head, as transformers marks loaded weights
        return self


def build_classifier(model_path: str | Path, num_labels: int | None, pooling: str = "auto",
                     **labels_kwargs) -> nn.Module:
    """A sequence classifier over a pretrained encoder; its new head of ``num_labels`` is initialised at random.
    ``num_labels=None`` keeps the folder's own head: a trained one if it has one (a ``...ForSequenceClassification``
    checkpoint, or a merged folder's ``classifier.safetensors``), else a random one of the config's size."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    pooling = resolve_pooling(model_path, pooling)
    if pooling == "cls" and _decoder_only(model_path):
        from .data import DataError

        raise DataError(f"pooling 'cls' on {model_path}: a decoder-only model's first token sees none of the text "
                        "after it; use pooling auto (the last non-padding token) or mean")
    if pooling == "pooler":
        sized = {} if num_labels is None else {"num_labels": num_labels}
        return AutoModelForSequenceClassification.from_pretrained(model_path, **sized, **labels_kwargs)
    encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False) if _has_pooler_arg(model_path) \
        else AutoModel.from_pretrained(model_path)
    model = PooledForSequenceClassification(encoder, num_labels or encoder.config.num_labels, pooling)
    head = Path(model_path) / CLASSIFIER_FILE
    if num_labels is None and head.is_file():
        model.load_head(head)
    return model


def _has_pooler_arg(model_path) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).model_type in ("bert", "roberta", "xlm-roberta", "camembert")


def _decoder_only(model_path) -> bool:
    """A causal decoder (GPT-2, LLaMA, Gemma): it has a causal-LM class in transformers and no masked-LM one."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = AutoConfig.from_pretrained(model_path).model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
