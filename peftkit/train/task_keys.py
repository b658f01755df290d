"""The run-config keys that belong to one task (columns, generation settings, tag schemes, ...).

``RunConfig`` inherits them, so they are ordinary top-level keys (``--label_column``, ``--tag_scheme``); they live
here so that each task's settings sit together and the core of the run config stays short. A new task adds its
keys to this class, prefixed in the description with the task's name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TARGETS = ("coverage", "in_scope_precision", "threshold")


class OodSection(BaseModel):
    """classification: reject inputs outside the training intents (``peftkit.tasks.ood``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    method: Literal["msp", "energy", "maxlogit"] = Field(
        "msp", description="score: max softmax probability, negative energy T*logsumexp(logits/T), or max logit")
    coverage: float | None = Field(None, gt=0, le=1, description="calibrate on dev: keep this share of in-scope rows "
                                   "(the default target, 0.95, when no target is given)")
    in_scope_precision: float | None = Field(None, gt=0, le=1, description="calibrate on ood_dev_file: this share of "
                                             "accepted rows is in scope")
    threshold: float | None = Field(None, description="a fixed threshold instead of a calibrated one")
    label: str = Field("out_of_scope", min_length=1, description="the label answered for rejected inputs (and read "
                       "as out of scope in eval files, like any label unseen in training)")
    temperature: float = Field(1.0, gt=0, description="T of the energy score")

    @model_validator(mode="after")
    def _one_target(self) -> "OodSection":
        given = [key for key in TARGETS if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"give one target, not {' and '.join(given)}: coverage (calibrated on dev), "
                             "in_scope_precision (calibrated on ood_dev_file) or threshold (fixed)")
        if not given:
            self.__dict__["coverage"] = 0.95  # (no assignment: it would validate again)
        return self

    def target(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in TARGETS if getattr(self, key) is not None}



def section_flag(value):
    """A section key given as a switch: ``true`` turns it on with its defaults, ``false`` off."""
    if value is True:
        return {}
    return None if value is False else value


class TaskKeys(BaseModel):
    # classification
    pooling: Literal["auto", "pooler", "cls", "mean"] = Field(
        "auto", description="features the classifier sees: auto = the model's sentence-transformers pooling if any, else pooler")
    text_column: str = Field("text", description="column with the text")
    text_pair_column: str | None = Field(None, description="second text column for sentence pairs (NLI)")
    label_column: str = Field("label", description="column with the label (strings or integers)")
    # causal-lm
    prompt_column: str = Field("prompt", description="causal-lm: column with the prompt (CSV/TSV/JSONL)")
    completion_column: str = Field("completion", description="causal-lm: column with the answer to learn")
    system_prompt: str | None = Field(None, description="causal-lm: system message before prompt/completion rows")
    eval_generations: int = Field(32, ge=0, description="causal-lm: dev prompts answered at the end (base vs adapted)")
    max_new_tokens: int = Field(128, gt=0, description="causal-lm: longest answer generated in that evaluation")
    # token-classification
    tag_scheme: Literal["auto", "IOB2", "BIOES"] = Field("auto", description="token-classification: tags (auto: detected)")
    strict_tags: bool = Field(True, description="token-classification: invalid tag transitions are errors; seqeval strict mode")
    label_all_tokens: bool = Field(False, description="token-classification: train on every sub-token of a word (B-x "
                                   "-> I-x after the first), not only the first; predictions read the first")
    # classification: out-of-scope rejection
    ood: OodSection | None = Field(None, description="classification: reject out-of-scope inputs (set any ood.* key, or ood: true)")
    ood_dev_file: str | None = Field(None, description="classification: calibration file with in-scope and out-of-scope "
                                     "rows for the ood threshold (default: dev)")

    # ranking (label_column above: a candidate's label, 0 not relevant, 1 relevant, larger graded)
    query_column: str = Field("query", description="ranking: column with the query (e.g. a user's profile text)")
    item_column: str = Field("item", description="ranking: column with a candidate item's text (pointwise rows)")
    positive_column: str = Field("positive", description="ranking: JSONL column with the relevant item(s) of a listwise row")
    negatives_column: str = Field("negatives", description="ranking: JSONL column with the list of non-relevant items")

    # every task: where the scalars go while training (peftkit.train.tracking; live.json for `peftkit ui` always)
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="trackers: tensorboard and/or mlflow (MLFLOW_TRACKING_URI, default "
        "sqlite in the run folder); none: neither")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value):
        if isinstance(value, str):  # --report_to mlflow, or a comma-separated list
            value = [part.strip() for part in value.split(",") if part.strip()]
        return [] if value in (["none"], None) else value

    @field_validator("ood", mode="before")
    @classmethod
    def _ood_flag(cls, value):
        return section_flag(value)

    @model_validator(mode="after")
    def _ood_fits(self) -> "TaskKeys":
        task = getattr(self, "task", "classification")
        if self.ood is not None and task != "classification":
            raise ValueError(f"ood: out-of-scope rejection is for task classification, not {task!r}; drop the ood settings")
        if self.label_all_tokens and task != "token-classification":
            raise ValueError(f"label_all_tokens is for task token-classification, not {task!r}; drop it")
        if self.ood_dev_file is not None and self.ood is None:
            raise ValueError("ood_dev_file: set ood (e.g. ood.in_scope_precision 0.95) to use a calibration file")
        if self.ood is not None and self.ood.in_scope_precision is not None and self.ood_dev_file is None:
            raise ValueError("ood.in_scope_precision needs out-of-scope examples to calibrate on: set ood_dev_file to "
                             f"a file with rows labelled {self.ood.label!r}, or use ood.coverage (in-scope dev rows only)")
        return self
