"""Out-of-scope rejection for classification (``ood:`` in a run config): confidence scores, threshold calibration and
the metrics of a file that holds out-of-scope rows.

A score is a confidence, *higher = more in scope*, computed from the classifier's logits:

- ``msp``: the maximum softmax probability, max_k softmax(z)_k;
- ``energy``: the negative energy, −E(z) = T·logsumexp(z / T) (T = ``ood.temperature``, default 1);
- ``maxlogit``: the maximum logit, max_k z_k.

An input is answered with the configured label (``ood.label``, default ``out_of_scope``) exactly when its score is
below the threshold. The threshold is fixed (``ood.threshold``) or calibrated at the end of training on dev (or on
``ood_dev_file``): ``ood.coverage`` keeps that share of the in-scope calibration rows; ``ood.in_scope_precision``
(needs out-of-scope rows) makes that share of the accepted rows in scope, keeping as many in-scope rows as possible.
The rule (method, temperature, label, threshold) is stored with the labels in the run folder's ``labels.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

#: target of an out-of-scope row (its label is the configured one, or none of the training labels)
OUT_OF_SCOPE = -1


def _msp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits, -1).max(-1).values


def _energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return temperature * torch.logsumexp(logits / temperature, -1)


def _maxlogit(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.max(-1).values


SCORES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"msp": _msp, "energy": _energy, "maxlogit": _maxlogit}


def score(logits: torch.Tensor, method: str, temperature: float = 1.0) -> torch.Tensor:
    """The confidence of each row of ``logits`` (``[n, labels]``), higher = more in scope."""
    return SCORES[method](logits.float(), temperature)


@dataclass
class OodRule:
    """How a run rejects inputs: the score, its temperature, the label it answers, and the threshold (None until
    calibrated)."""

    method: str = "msp"
    label: str = "out_of_scope"
    temperature: float = 1.0
    threshold: float | None = None

    @classmethod
    def from_config(cls, section) -> "OodRule":
        return cls(section.method, section.label, section.temperature, section.threshold)

    @classmethod
    def from_dict(cls, data: dict) -> "OodRule":
        if not isinstance(data, dict) or data.get("method") not in SCORES:
            raise ValueError(f"'ood' must hold a method ({', '.join(SCORES)}), got {data!r}")
        threshold = data.get("threshold")
        return cls(data["method"], str(data.get("label", "out_of_scope")), float(data.get("temperature", 1.0)),
                   None if threshold is None else float(threshold))

    def to_dict(self) -> dict:
        return asdict(self)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return score(logits, self.method, self.temperature)

    def rejected(self, scores: torch.Tensor) -> torch.Tensor:
        """Which rows are answered with the out-of-scope label (none before calibration)."""
        if self.threshold is None:
            return torch.zeros(scores.shape[0], dtype=torch.bool)
        return scores < self.threshold


# ------------------------------------------------------------------------------------------ calibration
def coverage_threshold(in_scope: Sequence[float], coverage: float) -> float:
    """The highest threshold that keeps (score >= threshold) at least ``coverage`` of the in-scope scores."""
    ranked = sorted(in_scope, reverse=True)
    if not ranked:
        raise ValueError("no in-scope rows to calibrate on")
    keep = max(1, math.ceil(coverage * len(ranked) - 1e-9))
    return float(ranked[keep - 1])


def precision_threshold(in_scope: Sequence[float], out_of_scope: Sequence[float], precision: float) -> tuple[float, bool]:
    """The lowest threshold at which at least ``precision`` of the accepted rows are in scope (the most in-scope
    rows kept); (threshold, reached). Not reachable: the threshold of the best precision, and False."""
    if not in_scope or not out_of_scope:
        raise ValueError("calibrating for in_scope_precision needs in-scope and out-of-scope rows")
    rows = sorted([(s, True) for s in in_scope] + [(s, False) for s in out_of_scope], key=lambda r: -r[0])
    accepted = accepted_in = 0
    best: tuple[float, float] | None = None  # (precision, threshold)
    chosen = None
    for index, (value, inside) in enumerate(rows):
        accepted += 1
        accepted_in += inside
        if index + 1 < len(rows) and rows[index + 1][0] == value:
            continue  # a threshold accepts every row with the same score
        share = accepted_in / accepted
        if share >= precision:
            chosen = value
        if best is None or share > best[0]:
            best = (share, value)
    if chosen is not None:
        return float(chosen), True
    return float(best[1]), False


def calibrate(rule: OodRule, logits: torch.Tensor, in_scope: torch.Tensor, target: dict[str, float]) -> dict:
    """Set ``rule.threshold`` from calibration rows (``in_scope``: a boolean mask) for ``target``: ``{"coverage": c}``,
    ``{"in_scope_precision": p}`` or ``{"threshold": x}``. Returns what was done and reached (for report.json)."""
    (kind, value), = target.items()
    scores = rule.scores(logits)
    inside, outside = scores[in_scope].tolist(), scores[~in_scope].tolist()
    reached = True
    if kind == "threshold":
        threshold = float(value)
    elif kind == "coverage":
        threshold = coverage_threshold(inside, value)
    else:
        threshold, reached = precision_threshold(inside, outside, value)
    rule.threshold = threshold
    accepted = ~rule.rejected(scores)
    out = {"target": kind, "value": value, "threshold": threshold, "reached": reached,
           "in_scope_rows": len(inside), "out_of_scope_rows": len(outside),
           "coverage": float(accepted[in_scope].double().mean()) if inside else None}
    if outside:
        out["in_scope_precision"] = float(in_scope[accepted].double().mean()) if bool(accepted.any()) else None
    return out


# ---------------------------------------------------------------------------------------------- metrics
def metrics(logits: torch.Tensor, targets: Sequence[int], rule: OodRule) -> dict:
    """In-scope accuracy (a rejected in-scope row counts as wrong), closed-set accuracy (argmax, no rejection),
    coverage, out-of-scope recall and precision, overall accuracy (the out-of-scope label as one more class) and
    AUROC of the score (in scope = positive; scikit-learn), at the rule's threshold."""
    from sklearn.metrics import roc_auc_score

    targets_t = torch.as_tensor(list(targets), dtype=torch.long)
    scores = rule.scores(logits)
    rejected = rule.rejected(scores)
    best = logits.argmax(-1)
    inside = targets_t != OUT_OF_SCOPE
    correct = (best == targets_t) & ~rejected
    n_in, n_out, n_rejected = int(inside.sum()), int((~inside).sum()), int(rejected.sum())
    out = {"threshold": rule.threshold, "method": rule.method, "in_scope_rows": n_in, "out_of_scope_rows": n_out,
           "in_scope_accuracy": _share(correct[inside]), "closed_set_accuracy": _share((best == targets_t)[inside]),
           "coverage": _share(~rejected[inside]),
           "out_of_scope_recall": _share(rejected[~inside]),
           "out_of_scope_precision": float((rejected & ~inside).sum()) / n_rejected if n_rejected else None,
           "overall_accuracy": _share(correct | (rejected & ~inside)),
           "auroc": float(roc_auc_score(inside.numpy(), scores.numpy())) if n_in and n_out else None}
    return out


def _share(mask: torch.Tensor) -> float | None:
    return float(mask.double().mean()) if mask.numel() else None


def summary(result: dict) -> str:
    """One line of the out-of-scope figures (absent ones, e.g. AUROC without out-of-scope rows, are left out)."""
    names = {"in_scope_accuracy": "in-scope accuracy", "out_of_scope_recall": "OOS recall",
             "out_of_scope_precision": "OOS precision", "auroc": "AUROC", "threshold": "threshold"}
    return "   ".join(f"{label} {result[key]:.4f}" for key, label in names.items() if result.get(key) is not None)
