"""Ranking with a cross-encoder (``task: ranking``): one relevance logit per (query, item) pair.

The model is classification's sequence classifier (same poolings, ``heads.py``) with a single output: the query
(e.g. a user's profile text) and an item are one sentence pair, and the logit is the item's score for that query.
An example is a whole query with its candidates (``ranking_data.Group``): ``encode`` tokenizes every pair of it,
``collate`` flattens the pairs of a batch of queries into rows (forwarded in chunks of ``CHUNK_ROWS``), and
``logits`` puts the scores back as one row per query, ``[queries, candidates]``, padded with -inf. ``batch_size``
therefore counts queries, each with all its candidates.

The loss is listwise: softmax cross-entropy over a query's candidates with the target distribution given by the
labels (one positive among sampled negatives: -log p(positive)). Why listwise rather than pointwise BCE: the task is
to order a query's candidates, and the softmax loss trains exactly that comparison (it is invariant to a per-query
shift of the scores, which pointwise BCE must also learn); it is a bound on NDCG (Bruch et al., 2019, "An Analysis
of the Softmax Cross Entropy Loss for Learning-to-Rank with Binary and Graded Relevance"); and one positive with
many sampled negatives, the usual shape of recommendation data, needs no class re-weighting, which BCE would.

Evaluation ranks each query's candidate list: NDCG@10, HR@10 and MRR (``ranking_metrics.py``, ties by
expectation). ``peftkit rank --run RUN --query TEXT --candidates FILE --top K`` prints the ranked items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import Datasets, Task, register_task
from . import ranking_data as R
from . import ranking_metrics as M
from .data import DataError

PLAN = "rank_plan"  # the batch key saying which query and slot each row is (popped before the model sees the batch)
CHUNK_ROWS = 256  # pairs per model forward: a batch of queries with 100 candidates each must not be one forward
K = M.CUTOFF


class RankOutputs:
    """The model's scores of a batch's rows, with the plan that maps them back to queries."""

    def __init__(self, scores: torch.Tensor, plan: dict) -> None:
        self.scores, self.plan = scores, plan


class Ranking(Task):
    name = "ranking"
    vocabulary_file = "ranking.json"
    column_keys = ("query_column", "item_column", "label_column", "positive_column", "negatives_column")
    curve_metrics = (f"ndcg_{K}", f"hr_{K}", "mrr")
    best_metrics = (f"ndcg_{K}", f"hr_{K}", "mrr", "loss")
    pooled_head = False  # an example is a list of pairs: head-only trains through the plain forward

    # -- the model ---------------------------------------------------------------------------------------
    def build_model(self, model_path: str, config, vocabulary: dict) -> nn.Module:
        from .heads import build_classifier

        return build_classifier(model_path, 1, config.pooling, id2label={0: "relevance"}, label2id={"relevance": 0})

    # -- reading data ------------------------------------------------------------------------------------
    def read(self, path: str | Path, config, labelled: bool = True) -> list[R.Group]:
        return R.read_groups(path, R.RankColumns.of(config), labelled)

    def load_datasets(self, config) -> Datasets:
        if config.distill is not None:
            from ..config import ConfigError

            raise ConfigError("distill: is offered for classification; drop the distill settings for ranking")
        train = self.read(config.train_file, config)
        for group in train:  # the listwise loss learns a positive against negatives
            if all(label > 0 for label in group.labels):
                raise DataError(f"{config.train_file}, line {group.line}: the query has no negative candidate "
                                "(label 0); the ranking loss compares relevant items with others: add sampled "
                                "negatives or drop the query")
        dev = self.read(config.dev_file, config) if config.dev_file else None
        if dev is None:
            train, dev = R.random_split(train, config.dev_split, config.seed)
        test = self.read(config.test_file, config) if config.test_file else []
        return Datasets({"outputs": ["relevance"], "k": K}, train, dev, test)

    def inputs(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[R.Group]:
        """``peftkit predict --text QUERY --text_pair ITEM``: each pair is a query with one candidate."""
        if not pairs:
            raise DataError("ranking scores (query, item) pairs: give --text QUERY --text_pair ITEM, or use "
                            "`peftkit rank --query ... --candidates FILE`")
        return [R.Group(text, (pair,), None, i + 1) for i, (text, pair) in enumerate(zip(texts, pairs))]

    def candidates(self, query: str, items: Sequence[str]) -> R.Group:
        """One query with its candidate items (``peftkit rank``)."""
        if not query.strip():
            raise DataError("the query is empty")
        return R.Group(query.strip(), tuple(items), None, 1)

    def vocabulary_to_dict(self, vocabulary: dict) -> dict:
        return dict(vocabulary)

    def vocabulary_from_dict(self, data: dict) -> dict:
        if not isinstance(data, dict) or data.get("outputs") != ["relevance"]:
            raise DataError('must hold {"outputs": ["relevance"], "k": 10}')
        return data

    def names(self, vocabulary: dict) -> list[str]:
        return []  # one score, no label set

    def targets(self, examples: Sequence[R.Group], vocabulary: dict, source: str) -> list[list[float]]:
        return [list(group.labels) for group in examples]

    # -- batches -------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples: Sequence[R.Group], max_length: int) -> list[dict]:
        features = []
        for group in examples:
            # longest_first: a long query (a profile) is cut before the short item text that tells candidates apart
            encoded = tokenizer([group.query] * len(group.items), list(group.items), truncation="longest_first",
                                max_length=max_length)
            rows = [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(group.items))]
            # input_ids: every row's tokens together (their count orders batches by length); collate splits them
            features.append({"input_ids": [t for row in rows for t in row["input_ids"]], "rows": rows})
        return features

    def collate(self, tokenizer, features: Sequence[dict]) -> dict:
        rows, group, slot = [], [], []
        for g, feature in enumerate(features):
            for s, row in enumerate(feature["rows"]):
                rows.append(row), group.append(g), slot.append(s)
        batch = dict(tokenizer.pad(rows, padding=True, return_tensors="pt"))
        width = max((len(f["rows"]) for f in features), default=0)
        batch[PLAN] = {"groups": len(features), "width": width, "group": torch.tensor(group, dtype=torch.long),
                       "slot": torch.tensor(slot, dtype=torch.long)}
        return batch

    def forward(self, model: nn.Module, batch: dict, **kwargs) -> RankOutputs:
        inputs = {k: v for k, v in batch.items() if k != PLAN}
        count = inputs["input_ids"].shape[0]
        scores = [model(**{k: v[start:start + CHUNK_ROWS] for k, v in inputs.items()}, **kwargs).logits[:, 0]
                  for start in range(0, count, CHUNK_ROWS)]
        return RankOutputs(torch.cat(scores) if scores else torch.zeros(0), batch[PLAN])

    def logits(self, outputs: RankOutputs) -> torch.Tensor:
        """Scores [queries, candidates], -inf where a query has fewer candidates than the widest."""
        plan = outputs.plan
        out = outputs.scores.new_full((plan["groups"], plan["width"]), float("-inf"))
        out[plan["group"], plan["slot"]] = outputs.scores
        return out

    def loss_sum(self, logits: torch.Tensor, targets: Sequence[Sequence[float]]) -> torch.Tensor:
        target = torch.zeros(logits.shape, dtype=torch.float32)
        for i, labels in enumerate(targets):
            target[i, :len(labels)] = torch.as_tensor(list(labels), dtype=torch.float32)
        target = target / target.sum(1, keepdim=True)
        log_p = torch.log_softmax(logits.float(), -1)
        # padding slots have probability 0 (-inf logits) and target 0: keep their 0 * -inf out of the sum
        return -torch.where(target > 0, target * log_p, torch.zeros_like(log_p)).sum()

    def gather(self, pieces: Sequence[tuple[list[int], torch.Tensor]], count: int) -> torch.Tensor:
        width = max((logits.shape[1] for _, logits in pieces), default=0)
        out = torch.full((count, width), float("-inf"))
        for index, logits in pieces:
            out[index, :logits.shape[1]] = logits.float()
        return out

    # -- evaluation and report ---------------------------------------------------------------------------
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()  # the relevance logits themselves: scores comparable across queries and runs

    def metrics(self, logits: torch.Tensor, targets: Sequence[Sequence[float]], vocabulary: dict) -> dict:
        targets = [list(t) for t in targets]
        scores = [logits[i, :len(t)].tolist() for i, t in enumerate(targets)]
        result = M.mean_metrics(scores, targets, K)
        result["loss"] = float(self.loss_sum(logits, targets)) / len(targets) if targets else float("nan")
        result["report_text"] = M.report_text(result, K)
        return result

    def summary(self, result: dict) -> str:
        return f"NDCG@{K} {result[f'ndcg_{K}']:.4f}   HR@{K} {result[f'hr_{K}']:.4f}   MRR {result['mrr']:.4f}"

    def settings(self, config) -> dict:
        return {"pooling": config.pooling}

    def info(self, report: dict) -> dict:
        return {f"{split} NDCG@{K}": round(report[split][f"ndcg_{K}"], 4) for split in ("dev", "test") if split in report}

    # -- prediction output -------------------------------------------------------------------------------
    def prediction_rows(self, examples: Sequence[R.Group], outputs: torch.Tensor, vocabulary: dict) -> list[dict]:
        rows = []
        for i, group in enumerate(examples):
            rows.append({"query": group.query, "ranking": [
                {"rank": r + 1, "item": group.items[j], "score": round(score, 6)}
                for r, (j, score) in enumerate(ranked(outputs[i, :len(group.items)].tolist()))]})
        return rows

    def write_predictions(self, path: Path, rows: list[dict], vocabulary: dict) -> None:
        """JSON lines, one query with its ranking per line (any file name)."""
        from ..atomic import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

        atomic_write(path, write)

    # -- merged folders: classification's layout with one output ------------------------------------------
    def write_merged(self, folder: Path, plain: nn.Module, vocabulary: dict, config, run_path: Path, tokenizer) -> dict:
        from . import classification_merge as CM

        marker = CM.write(folder, plain, ["relevance"], config, run_path, tokenizer)
        marker.update({key: getattr(config, key) for key in self.column_keys})
        return marker

    def open_merged(self, folder: Path, marker: dict) -> tuple[dict, dict]:
        from . import classification_merge as CM

        values, _ = CM.open_folder(marker)
        values.update({key: marker[key] for key in self.column_keys if key in marker})
        return values, {"outputs": ["relevance"], "k": K}

    def merged_model(self, folder: Path, config, vocabulary: dict) -> nn.Module:
        from . import classification_merge as CM
        from .data import LabelMap

        return CM.model(folder, config.pooling, LabelMap(["relevance"]))


def ranked(scores: Sequence[float], top: int | None = None) -> list[tuple[int, float]]:
    """(candidate index, score), best first; equal scores keep the candidates' order; NaN last."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i] != scores[i], -scores[i] if scores[i] == scores[i] else 0))
    return [(i, float(scores[i])) for i in order[:top]]


register_task(Ranking())
