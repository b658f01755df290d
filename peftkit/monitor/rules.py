"""The alert-rule language of ``peftkit monitor --rule``.

Grammar (EBNF; keywords are case-insensitive, whitespace between tokens is free):

    rule     = measure, compare, number, window, [ "for", integer, ( "window" | "windows" ) ] ;
    measure  = ( "share" | "count" ), "(", label, ")" ;            (* label: a label of the run *)
    compare  = ">" | ">=" | "<" | "<=" ;
    window   = "over", integer, [ "records" ], [ "every", integer, [ "records" ] ]     (* a count window *)
             | "in", duration, [ "every", duration ] ;                                   (* a time window *)
    duration = integer, ( "s" | "m" | "h" | "d" ) ;

Meaning, per group (``--group-by``):

- ``over N every M``: the last N records of the group, evaluated after every M-th record once N have arrived.
  ``every`` defaults to N (back-to-back windows); ``every 1`` slides one record at a time.
- ``in D every S``: the records whose time lies in ``[b - D, b)``, evaluated at each boundary ``b`` (a multiple
  of S since the epoch) as soon as a record at or after ``b`` arrives (event time; ``every`` defaults to D).
- ``share(L)`` is the fraction of the window's records classified L, ``count(L)`` their number; an empty time
  window is no evidence: it never fires and breaks a streak.
- ``for K windows``: the condition must hold on K evaluations in a row (default 1). The alert fires once, on the
  evaluation that completes the K-th; it fires again only after an evaluation where the condition failed.

    share(negative) > 0.35 over 200 for 2 windows
    count(negative) >= 20 in 10m every 1m
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

EXAMPLES = '"share(negative) > 0.35 over 200 for 2 windows" or "count(negative) >= 20 in 10m"'
COMPARE: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                      "<=": operator.le}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TOKEN = re.compile(r"\s*(?:(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>[smhd](?![A-Za-z0-9_]))?|(?P<op>>=|<=|>|<)|"
                    r"(?P<paren>\()(?P<label>[^()]*)\)|(?P<word>[A-Za-z_][A-Za-z0-9_-]*)|(?P<other>\S))")


class RuleError(ValueError):
    """A rule that does not parse or does not fit the run; the message shows where and how to fix it."""


@dataclass(frozen=True)
class Rule:
    text: str
    measure: str  # "share" | "count"
    label: str
    compare: str
    threshold: float
    length: float  # records (count window) or seconds (time window)
    step: float
    by_time: bool
    repeat: int = 1

    def holds(self, value: float) -> bool:
        return COMPARE[self.compare](value, self.threshold)

    @property
    def unit(self) -> str:
        return "seconds" if self.by_time else "records"


@dataclass
class _Token:
    kind: str
    value: str
    unit: str | None
    column: int  # 1-based


def _tokens(text: str) -> list[_Token]:
    out, position = [], 0
    while position < len(text):
        found = _TOKEN.match(text, position)
        if found is None:  # only trailing whitespace is left
            break
        kind = next(k for k in ("number", "op", "paren", "word", "other") if found.group(k) is not None)
        value = found.group("label") if kind == "paren" else found.group(kind)
        start = found.start(kind)
        out.append(_Token(kind, value, found.group("unit") if kind == "number" else None, start + 1))
        position = found.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.at = text, _tokens(text), 0

    def fail(self, expected: str) -> RuleError:
        if self.at < len(self.tokens):
            token = self.tokens[self.at]
            where = f"column {token.column} ({self.text[token.column - 1:][:20]!r})"
        else:
            where = f"the end (column {len(self.text.rstrip()) + 1})"
        return RuleError(f"rule {self.text!r}: at {where}: expected {expected}. A rule reads like {EXAMPLES} "
                         "(see peftkit monitor --help for the grammar)")

    def peek(self, kind: str, *words: str) -> bool:
        if self.at >= len(self.tokens) or self.tokens[self.at].kind != kind:
            return False
        return not words or self.tokens[self.at].value.lower() in words

    def take(self, kind: str, expected: str, *words: str) -> _Token:
        if not self.peek(kind, *words):
            raise self.fail(expected)
        self.at += 1
        return self.tokens[self.at - 1]

    def _skip(self, word: str) -> None:
        if self.peek("word", word):
            self.at += 1

    def integer(self, expected: str, unit: bool = False) -> tuple[int, str | None]:
        token = self.take("number", expected)
        if "." in token.value or int(token.value) < 1 or (token.unit is not None) != unit:
            self.at -= 1
            raise self.fail(expected)
        return int(token.value), token.unit

    def parse(self) -> Rule:
        measure = self.take("word", "'share(LABEL)' or 'count(LABEL)'", "share", "count").value.lower()
        label = self.take("paren", "'(LABEL)' after " + measure).value.strip()
        if not label:
            self.at -= 1
            raise self.fail("a label inside the parentheses")
        compare = self.take("op", "a comparison: >, >=, < or <=").value
        number = self.take("number", "a number to compare with")
        threshold = float(number.value)
        if number.unit is not None or (measure == "share" and threshold > 1):
            self.at -= 1
            raise self.fail("a share between 0 and 1" if measure == "share" else "a plain number")
        if self.peek("word", "over"):
            self.at += 1
            length, _ = self.integer("a number of records (a whole number, at least 1)")
            self._skip("records")
            step = length
            if self.peek("word", "every"):
                self.at += 1
                step, _ = self.integer("a number of records (a whole number, at least 1)")
                self._skip("records")
            by_time = False
        elif self.peek("word", "in"):
            self.at += 1
            length, unit = self.integer("a duration such as 30s, 10m, 1h or 1d", unit=True)
            length *= UNITS[unit]
            step = length
            if self.peek("word", "every"):
                self.at += 1
                step, unit = self.integer("a duration such as 30s, 10m, 1h or 1d", unit=True)
                step *= UNITS[unit]
            by_time = True
        else:
            raise self.fail("'over N' (the last N records) or 'in DURATION' (e.g. 'in 10m')")
        repeat = 1
        if self.peek("word", "for"):
            self.at += 1
            repeat, _ = self.integer("a number of windows (a whole number, at least 1)")
            self.take("word", "'windows'", "window", "windows")
        if self.at < len(self.tokens):
            raise self.fail("the end of the rule (or 'every ...' / 'for K windows' right after the window)")
        if step > length:
            raise RuleError(f"rule {self.text!r}: 'every' ({step:g}) is longer than the window ({length:g}), so some "
                            "records would never be looked at; make 'every' at most the window length")
        return Rule(self.text.strip(), measure, label, compare, threshold, length, step, by_time, repeat)


def parse_rule(text: str) -> Rule:
    """One rule from its text; ``RuleError`` names the column where it stops making sense."""
    return _Parser(text).parse()


def check_labels(rules: list[Rule], labels: list[str]) -> None:
    """Every rule's label must be one the classifier can output."""
    for rule in rules:
        if rule.label not in labels:
            raise RuleError(f"rule {rule.text!r}: label {rule.label!r} is not one of the run's labels "
                            f"({', '.join(labels)}); use one of those")
