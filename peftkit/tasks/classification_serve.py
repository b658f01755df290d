"""The server's schema for classification: ``POST /v1/classify`` with single texts or sentence pairs, answered
with a label, its probability and every label's probability per text (pydantic models, in the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from .schema import Text


class ClassifyRequest(BaseModel):
    adapter: Text = Field(description="adapter name, or 'base' for the plain base model", max_length=200)
    texts: list[Text] | None = Field(None, description="texts to classify")
    pairs: list[tuple[Text, Text]] | None = Field(None, description="sentence pairs to classify")

    @model_validator(mode="after")
    def _one_input(self) -> "ClassifyRequest":
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("give exactly one of 'texts' or 'pairs'")
        return self


class Prediction(BaseModel):
    label: str
    probability: float
    probabilities: dict[str, float]


class OodPrediction(Prediction):
    """The answer of an adapter whose run rejects out-of-scope inputs (``ood:``): ``label`` is the run's out-of-scope
    label exactly when ``ood_score`` is below ``threshold``."""

    ood_score: float = Field(description="the run's confidence score (higher = more in scope)")
    threshold: float | None = Field(description="the run's calibrated threshold")


class ClassifyResponse(BaseModel):
    adapter: str
    predictions: list[OodPrediction | Prediction]
