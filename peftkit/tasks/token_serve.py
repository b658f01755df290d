"""The server's side of token classification: ``POST /v1/tag`` with texts, answered per text with its entity spans
(``{text, type, start, end, score}``, character offsets into the text as sent), its words and their tags — the rows
``peftkit predict --run RUN --text`` prints, computed by the same ``prediction_rows``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .schema import Text


class TagRequest(BaseModel):
    adapter: Text = Field(description="adapter name (a token-classification run folder)", max_length=200)
    texts: list[Text] = Field(description="texts to tag; each is split into words as `peftkit predict --text` does")


class Entity(BaseModel):
    text: str = Field(description="the entity as it stands in the input: text[start:end]")
    type: str
    start: int = Field(description="character offset of its first character in the input text")
    end: int = Field(description="character offset just after its last character")
    score: float = Field(description="mean probability of the predicted tag over the entity's words")


class Tagged(BaseModel):
    text: str
    entities: list[Entity]
    tokens: list[str]
    tags: list[str]


class TagResponse(BaseModel):
    adapter: str
    results: list[Tagged]


def serving_base(model_path: str):
    """The base as a transformers token classifier: its own head kept if the checkpoint has a trained one (a merged
    folder), else a random placeholder that every adapter replaces with its own head."""
    import warnings

    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": expected for a plain encoder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForTokenClassification.from_pretrained(model_path)
    finally:
        hf_logging.set_verbosity(verbosity)
    head = model.classifier
    trained = all(getattr(p, "_is_hf_initialized", False) for p in head.parameters())
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label.get(i, i)) for i in range(head.out_features)] if trained else None
    return model.eval(), labels
