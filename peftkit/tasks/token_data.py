"""Token-classification data: CoNLL and JSONL files, the tag set and its scheme, words of raw text with character
offsets, sub-token alignment and windows over long sentences, entity spans.

- CoNLL (any extension but .jsonl/.json): one ``token<TAB>tag`` (or ``token tag``: the last space-separated field
  is the tag) per line, a blank line between sentences, ``-DOCSTART-`` lines skipped. Unlabelled files may hold the
  token alone.
- JSONL: one sentence per line, ``{"tokens": [...], "tags": [...]}``; unlabelled rows may give ``tokens`` or a raw
  ``text`` (split into words like ``--text``).
- Tag schemes: IOB2 (``B-x``/``I-x``/``O``, "BIO") and BIOES (``S-x``/``E-x`` too); detected from the training tags
  unless ``tag_scheme`` names one. With ``strict_tags`` an invalid transition (``I-x`` after ``O``) is an error.

Every problem is a ``DataError`` naming the file and the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data import DataError, jsonl_rows, read_text

SCHEMES = ("IOB2", "BIOES")
_PREFIXES = {"IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S")}
# words of raw text: runs of letters/digits/underscore (inner hyphens and apostrophes kept: "state-of-the-art",
# "don't"), and every other non-space character alone ("U.S." -> "U", ".", "S", ".")
WORD = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...] | None  # None: unlabelled
    lines: tuple[int, ...]  # 1-based line of each word (JSONL: the row's line for every word)
    text: str | None = None  # the raw text the words were split from (``--text``), else None
    offsets: tuple[tuple[int, int], ...] | None = None  # character [start, end) of each word in ``text``
    # label_all_tokens (training sentences only): the tag of every sub-token after a word's first, per word
    piece_tags: tuple[str, ...] | None = None

    @property
    def line(self) -> int:
        return self.lines[0] if self.lines else 0

    def surface(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        """The sentence as text and each word's character offsets: the raw text if it came from one, else the words
        joined by single spaces."""
        if self.text is not None and self.offsets is not None:
            return self.text, self.offsets
        offsets, position = [], 0
        for word in self.words:
            offsets.append((position, position + len(word)))
            position += len(word) + 1
        return " ".join(self.words), tuple(offsets)


def split_words(text: str, line: int = 1) -> Sentence:
    """Words of a raw text with their exact character offsets (``text[start:end] == word``)."""
    matches = list(WORD.finditer(text))
    return Sentence(tuple(m.group() for m in matches), None, tuple(line for _ in matches), text,
                    tuple((m.start(), m.end()) for m in matches))


# --------------------------------------------------------------------------------------------- reading
def read_sentences(path: str | Path, labelled: bool = True) -> list[Sentence]:
    path = Path(path)
    raw = read_text(path)
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    sentences = _jsonl(path, raw, labelled) if jsonl else _conll(path, raw, labelled)
    if not sentences:
        raise DataError(f"{path}: no sentences (expected {'JSON lines with tokens and tags' if jsonl else 'token<TAB>tag lines'})")
    return sentences


def _conll(path: Path, raw: str, labelled: bool) -> list[Sentence]:
    sentences, words, tags, lines = [], [], [], []

    def close() -> None:
        if words:
            sentences.append(Sentence(tuple(words), tuple(tags) if labelled else None, tuple(lines)))
        words.clear(), tags.clear(), lines.clear()

    for number, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            close()
            continue
        fields = text.split("\t") if "\t" in text else text.split()
        fields = [f.strip() for f in fields]
        if fields[0] == "-DOCSTART-":
            close()
            continue
        if labelled and (len(fields) < 2 or not fields[-1]):
            raise DataError(f"{path}, line {number}: {text.strip()!r} has no tag; expected 'token<TAB>tag' "
                            "(or 'token tag'), and a blank line between sentences")
        words.append(fields[0])
        tags.append(fields[-1])
        lines.append(number)
    close()
    return sentences


def _jsonl(path: Path, raw: str, labelled: bool) -> list[Sentence]:
    sentences = []
    for number, row in jsonl_rows(path, raw, "'tokens' and 'tags'"):
        if not labelled and "tokens" not in row and isinstance(row.get("text"), str):
            sentences.append(split_words(row["text"], number))
            continue
        words = row.get("tokens")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{path}, line {number}: 'tokens' must be a non-empty list of strings")
        tags = None
        if labelled:
            tags = row.get("tags")
            if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
                raise DataError(f"{path}, line {number}: 'tags' must be a list of tag strings (one per token)")
            if len(tags) != len(words):
                raise DataError(f"{path}, line {number}: {len(words)} tokens but {len(tags)} tags; give one tag per token")
            tags = tuple(tags)
        sentences.append(Sentence(tuple(words), tags, tuple(number for _ in words)))
    return sentences


# -------------------------------------------------------------------------------------------- tag sets
def _split_tag(tag: str) -> tuple[str, str | None]:
    """("B", "PER") for "B-PER"; ("O", None) for "O"."""
    if tag == "O":
        return "O", None
    prefix, _, kind = tag.partition("-")
    return prefix, (kind or None)


def detect_scheme(sentences: Sequence[Sentence], requested: str, source: str) -> str:
    """The tag scheme of ``sentences`` (``requested``: "auto" or a scheme name), every tag checked to fit it."""
    prefixes = {_split_tag(tag)[0] for s in sentences for tag in s.tags}
    scheme = requested if requested != "auto" else ("BIOES" if prefixes & {"E", "S"} else "IOB2")
    allowed = _PREFIXES[scheme]
    for sentence in sentences:
        for tag, line in zip(sentence.tags, sentence.lines):
            prefix, kind = _split_tag(tag)
            if prefix != "O" and (prefix not in allowed or kind is None):
                raise DataError(f"{source}, line {line}: tag {tag!r} is not a {scheme} tag (expected O or "
                                f"{', '.join(p + '-TYPE' for p in allowed)})"
                                + ("; set tag_scheme: BIOES for E-/S- tags" if prefix in ("E", "S") else ""))
    return scheme


def check_transitions(sentences: Sequence[Sentence], scheme: str, source: str) -> None:
    """Every tag must be a valid continuation of the one before it (strict tags)."""
    for sentence in sentences:
        tags = (*sentence.tags, "O")
        previous = ("O", None)
        for i, tag in enumerate(tags):
            prefix, kind = _split_tag(tag)
            continues = previous[0] in ("B", "I") and previous[1] == kind
            if prefix in (("I",) if scheme == "IOB2" else ("I", "E")) and not continues:
                where = sentence.lines[min(i, len(sentence.lines) - 1)]
                raise DataError(f"{source}, line {where}: tag {tag!r} after {_join(previous)!r} is not a valid "
                                f"{scheme} transition (an entity starts with B-{kind}); fix the tag, or set "
                                "strict_tags: false to read such tags leniently")
            if scheme == "BIOES" and previous[0] in ("B", "I") and not (prefix in ("I", "E") and kind == previous[1]):
                where = sentence.lines[min(i, len(sentence.lines) - 1)]
                raise DataError(f"{source}, line {where}: {_join(previous)!r} is not closed (BIOES ends an entity "
                                f"with E-{previous[1]}; found {tag!r}); fix the tags, or set strict_tags: false")
            previous = (prefix, kind)


def _join(split: tuple[str, str | None]) -> str:
    return split[0] if split[1] is None else f"{split[0]}-{split[1]}"


@dataclass
class TagSet:
    """The tags a run predicts (``tags.json``): names in a fixed order, the scheme, and whether decoding is strict."""

    names: list[str]
    scheme: str = "IOB2"
    strict: bool = True

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_sentences(cls, sentences: Sequence[Sentence], scheme: str, strict: bool) -> "TagSet":
        tags = {tag for s in sentences for tag in s.tags}
        # O first, then by entity type and prefix: B-x, I-x (, E-x, S-x) side by side
        order = {p: i for i, p in enumerate(("B", "I", "E", "S"))}
        return cls(sorted(tags, key=lambda t: (t != "O", _split_tag(t)[1] or "", order.get(_split_tag(t)[0], 9))),
                   scheme, strict)

    def ids(self, sentences: Sequence[Sentence], source: str) -> list[list[int]]:
        out = []
        for sentence in sentences:
            for tag, line in zip(sentence.tags, sentence.lines):
                if tag not in self.index:
                    raise DataError(f"{source}, line {line}: tag {tag!r} does not occur in the training data "
                                    f"(training tags: {', '.join(self.names)}); fix it or add examples of it to train")
            out.append([self.index[tag] for tag in sentence.tags])
        return out

    def continuation(self, tag: str) -> str:
        """The tag of a word's sub-tokens after its first (``label_all_tokens``): ``I-x`` for a ``B-x`` word when the
        tag set has ``I-x``; any other tag is repeated (BIOES: the pieces of an ``E-x`` or ``S-x`` word stay ``E-x``
        / ``S-x``, of an ``I-x`` word ``I-x``; the rule of transformers' ``run_ner.py``)."""
        prefix, kind = _split_tag(tag)
        inside = f"I-{kind}"
        return inside if prefix == "B" and inside in self.index else tag

    @property
    def types(self) -> list[str]:
        """The entity types, sorted."""
        return sorted({kind for kind in (_split_tag(t)[1] for t in self.names) if kind})

    def to_dict(self) -> dict:
        return {"tags": self.names, "scheme": self.scheme, "strict": self.strict}

    @classmethod
    def from_dict(cls, data: dict) -> "TagSet":
        tags = data.get("tags") if isinstance(data, dict) else None
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise DataError('must hold {"tags": [names...], "scheme": "IOB2" or "BIOES", "strict": true/false}')
        scheme = data.get("scheme", "IOB2")
        if scheme not in SCHEMES:
            raise DataError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        return cls(list(tags), scheme, bool(data.get("strict", True)))

    def __len__(self) -> int:
        return len(self.names)


def entities(tags: Sequence[str], scheme: str, strict: bool) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity in a tag sequence, as seqeval reads it: strict mode keeps
    only well-formed chunks of the scheme; lenient mode is conlleval's reading (an ``I-x`` after ``O`` opens one)."""
    if strict:
        from seqeval.scheme import IOB2, IOBES, Entities

        found = Entities([list(tags)], IOB2 if scheme == "IOB2" else IOBES).entities[0]
        return [(e.tag, e.start, e.end) for e in found]
    from seqeval.metrics.sequence_labeling import get_entities

    return [(kind, start, end + 1) for kind, start, end in get_entities(list(tags))]


# ------------------------------------------------------------------------------- sub-tokens and windows
def word_pieces(tokenizer, words: Sequence[str], budget: int) -> list[list[int]]:
    """Sub-token ids of each word (each tokenized alone; a word the tokenizer drops becomes its unknown token; a
    word longer than a whole window keeps its first ``budget`` sub-tokens)."""
    ids = tokenizer(list(words), add_special_tokens=False)["input_ids"] if words else []
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return [(piece or [unk])[:budget] for piece in ids]


def windows(lengths: Sequence[int], budget: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Word ranges [start, end) of at most ``budget`` sub-tokens covering every word, consecutive windows sharing
    about a quarter of a window of words (the stride), and for each word the window it is predicted from: the one
    where it has the most context (the largest distance to the window's nearest edge, in sub-tokens)."""
    overlap = budget // 4
    spans, start, count = [], 0, len(lengths)
    if not count:
        return [], []
    while True:
        end, used = start, 0
        while end < count and used + lengths[end] <= budget:
            used += lengths[end]
            end += 1
        end = max(end, start + 1)  # a word alone may fill a window (its pieces are cut to the budget)
        spans.append((start, end))
        if end >= count:
            break
        following, shared = end, 0  # the next window starts `overlap` sub-tokens before this one's end
        while following - 1 > start and shared + lengths[following - 1] <= overlap:
            following -= 1
            shared += lengths[following]
        start = following
    best = []
    for word in range(count):
        def context(w: int) -> int:
            s, e = spans[w]
            return min(sum(lengths[s:word]), sum(lengths[word + 1:e]))

        candidates = [w for w, (s, e) in enumerate(spans) if s <= word < e]
        best.append(max(candidates, key=context))
    return spans, best


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after one text (BERT: [CLS] and [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []
