"""The run-config keys that belong to one task (columns, generation settings, tag schemes, ...).

``RunConfig`` inherits them, so they are ordinary top-level keys (``--label_column``, ``--tag_scheme``); they live
here so that each task's settings sit together and the core of the run config stays short. A new task adds its
keys to this class, prefixed in the description with the task's name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
    # ranking (label_column above: a candidate's label, 0 not relevant, 1 relevant, larger graded)
    query_column: str = Field("query", description="ranking: column with the query (e.g. a user's profile text)")
    item_column: str = Field("item", description="ranking: column with a candidate item's text (pointwise rows)")
    positive_column: str = Field("positive", description="ranking: JSONL column with the relevant item(s) of a listwise row")
    negatives_column: str = Field("negatives", description="ranking: JSONL column with the list of non-relevant items")
