"""Token classification (NER): one tag per word (``task: token-classification``).

The model is transformers' ``AutoModelForTokenClassification`` with a new head sized to the tags (saved with the
adapter as ``modules_to_save``, like classification's head). Data, the tag set (``tags.json``), windows and spans:
``token_data.py``; metrics: ``token_metrics.py``.

How a sentence becomes predictions: each word is tokenized alone; the first sub-token of a word carries its tag
and the others are ignored in the loss. A sentence longer than ``max_length`` sub-tokens (special tokens included)
is split into windows of whole words that overlap by about a quarter of a window; every word is predicted from
the window where it has the most context, so no word is ever dropped. The batch ``collate`` builds holds one row
per window; ``logits`` stitches the rows back into one row of word logits per sentence ([sentences, words, tags],
zero-padded), which is what ``loss_sum``, ``gather``, ``metrics`` and ``prediction_rows`` see. The loss of a
sentence is the mean cross-entropy over its words; sentences are then summed like classification's examples.

``label_all_tokens: true`` labels the other sub-tokens of a word too (``TagSet.continuation``: ``I-x`` for a ``B-x``
word, otherwise the word's own tag) in the training sentences: their targets are (word tags, sub-token tags) and
``logits`` appends, per word, the summed log-probabilities of its other sub-tokens after the word logits
([sentences, 2 x words, tags]), so that ``loss_sum`` adds each such sub-token's cross-entropy to its sentence's
(every labelled sub-token weighs the same; the sum is still divided by the number of words). Evaluation and
predictions read the first sub-token of each word only, with or without the option.

Predictions are entity spans ``{text, type, start, end, score}``: character offsets into the input text (for
``--text``: the text as given; for a file: its words joined by single spaces), ``score`` the mean over the span's
words of the probability of each word's predicted tag.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import Datasets, ServeSchema, Task, register_task
from . import token_data as T
from .data import DataError

PLAN = "token_plan"  # the batch key holding where each word's logits are (popped before the model sees the batch)


class TokenOutputs:
    """The model's outputs for a batch of window rows, with the plan that maps them back to words."""

    def __init__(self, raw, plan: dict) -> None:
        self.raw, self.plan = raw, plan

    def __getattr__(self, name: str):  # hidden_states etc. (distillation) come from the model's own outputs
        return getattr(self.__dict__["raw"], name)


class TokenClassification(Task):
    name = "token-classification"
    vocabulary_file = "tags.json"
    column_keys = ()
    curve_metrics = ("f1", "accuracy")
    best_metrics = ("f1", "macro_f1", "accuracy", "loss")
    pooled_head = False

    # -- the model ---------------------------------------------------------------------------------------
    def build_model(self, model_path: str, config, vocabulary: T.TagSet) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        names = dict(enumerate(vocabulary.names))
        return AutoModelForTokenClassification.from_pretrained(
            model_path, num_labels=len(vocabulary), id2label=names, label2id={v: k for k, v in names.items()},
            ignore_mismatched_sizes=True)

    # -- reading data ------------------------------------------------------------------------------------
    def read(self, path: str | Path, config, labelled: bool = True) -> list[T.Sentence]:
        return T.read_sentences(path, labelled)

    def load_datasets(self, config) -> Datasets:
        if config.distill is not None:
            from ..config import ConfigError

            raise ConfigError("distill: is offered for classification; drop the distill settings for token-classification")
        train = self.read(config.train_file, config)
        scheme = T.detect_scheme(train, config.tag_scheme, str(config.train_file))
        tags = T.TagSet.from_sentences(train, scheme, config.strict_tags)
        if len(tags) < 2:
            raise DataError(f"{config.train_file}: only one tag ({tags.names[0]!r}); a tagger needs two or more")
        splits = {}
        for split in ("dev", "test"):
            path = getattr(config, f"{split}_file")
            splits[split] = self.read(path, config) if path else []
            if path:
                tags.ids(splits[split], str(path))  # a tag unseen in train: an error naming file and line
        for path, sentences in ((config.train_file, train), (config.dev_file, splits["dev"]),
                                (config.test_file, splits["test"])):
            if config.strict_tags and sentences:
                T.check_transitions(sentences, scheme, str(path))
        if not config.dev_file:
            import random

            order = list(range(len(train)))
            random.Random(config.seed).shuffle(order)
            take = max(1, int(round(len(train) * config.dev_split))) if len(train) > 1 else 0
            splits["dev"], train = [train[i] for i in order[:take]], [train[i] for i in order[take:]]
        if config.label_all_tokens:  # training sentences only: evaluation reads each word's first sub-token
            train = [replace(s, piece_tags=tuple(tags.continuation(t) for t in s.tags)) for s in train]
        return Datasets(tags, train, splits["dev"], splits["test"])

    def inputs(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[T.Sentence]:
        if pairs:
            raise DataError("token-classification tags single texts; drop --text_pair")
        return [T.split_words(text, i + 1) for i, text in enumerate(texts)]

    def vocabulary_to_dict(self, vocabulary: T.TagSet) -> dict:
        return vocabulary.to_dict()

    def vocabulary_from_dict(self, data: dict) -> T.TagSet:
        return T.TagSet.from_dict(data)

    def names(self, vocabulary: T.TagSet) -> list[str]:
        return vocabulary.names

    def targets(self, examples: Sequence[T.Sentence], vocabulary: T.TagSet, source: str) -> list:
        """One tag id per word; with ``label_all_tokens`` (``piece_tags`` set): (those, the sub-token tag ids)."""
        words = vocabulary.ids(examples, source)
        return [ids if s.piece_tags is None else (ids, [vocabulary.index[t] for t in s.piece_tags])
                for ids, s in zip(words, examples)]

    # -- batches -------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples: Sequence[T.Sentence], max_length: int) -> list[dict]:
        prefix, suffix = T.special_tokens(tokenizer)
        budget = max_length - len(prefix) - len(suffix)
        if budget < 1:
            raise DataError(f"max_length {max_length} leaves no room for words beside the tokenizer's "
                            f"{len(prefix) + len(suffix)} special tokens; raise max_length")
        features = []
        for sentence in examples:
            pieces = T.word_pieces(tokenizer, sentence.words, budget)
            lengths = [len(p) for p in pieces]
            spans, best = T.windows(lengths, budget)
            # input_ids: all sub-tokens (their count orders batches by length); collate cuts the windows
            features.append({"input_ids": [i for p in pieces for i in p], "lengths": lengths, "spans": spans,
                             "best": best, "special": (prefix, suffix), "all_pieces": sentence.piece_tags is not None})
        return features

    def collate(self, tokenizer, features: Sequence[dict]) -> dict:
        rows, sentence, word, row, position, owner = [], [], [], [], [], []
        pieces: list[tuple[int, int, int, int]] = []  # label_all_tokens: (sentence, word, row, position) of the rest
        for s, feature in enumerate(features):
            prefix, suffix = feature["special"]
            starts = [0]
            for length in feature["lengths"]:
                starts.append(starts[-1] + length)
            first_row = len(rows)
            for a, b in feature["spans"]:
                rows.append({"input_ids": prefix + feature["input_ids"][starts[a]:starts[b]] + suffix})
                owner.append(s)
            for w, window in enumerate(feature["best"]):
                sentence.append(s), word.append(w), row.append(first_row + window)
                position.append(len(prefix) + starts[w] - starts[feature["spans"][window][0]])
                if feature.get("all_pieces"):
                    pieces += [(s, w, row[-1], position[-1] + k) for k in range(1, feature["lengths"][w])]
        if not rows:  # only empty texts: one row of special tokens keeps the model's forward well-formed
            rows.append({"input_ids": list(features[0]["special"][0] + features[0]["special"][1])} if features
                        else {"input_ids": [0]})
        batch = dict(tokenizer.pad(rows, padding=True, return_tensors="pt"))
        width = max((len(f["lengths"]) for f in features), default=0)
        # "owner": the sentence of each window row (a mixed-adapter batch gives every window its sentence's adapter)
        batch[PLAN] = {"sentences": len(features), "width": width, "owner": owner,
                       **{k: torch.tensor(v, dtype=torch.long) for k, v in
                          (("sentence", sentence), ("word", word), ("row", row), ("position", position))}}
        if any(f.get("all_pieces") for f in features):
            batch[PLAN]["pieces"] = torch.tensor(pieces, dtype=torch.long).reshape(-1, 4).T
        return batch

    def forward(self, model: nn.Module, batch: dict, **kwargs) -> TokenOutputs:
        inputs = {k: v for k, v in batch.items() if k != PLAN}
        if kwargs.get("adapter_names") is not None:  # one name per sentence -> one per window row
            names, owner = kwargs["adapter_names"], batch[PLAN]["owner"]
            kwargs["adapter_names"] = [names[s] for s in owner] if owner else [names[0]] * len(inputs["input_ids"])
        return TokenOutputs(model(**inputs, **kwargs), batch[PLAN])

    def logits(self, outputs: TokenOutputs) -> torch.Tensor:
        """Word logits [sentences, words, tags]: each word's first sub-token in the window chosen for it."""
        plan, window = outputs.plan, outputs.raw.logits
        words = window.new_zeros(plan["sentences"], plan["width"], window.shape[-1])
        words[plan["sentence"], plan["word"]] = window[plan["row"], plan["position"]]
        if "pieces" not in plan:
            return words
        # label_all_tokens: per word, the summed log-probabilities of its other sub-tokens, after the word logits
        sentence, word, row, position = plan["pieces"]
        summed = window.new_zeros(words.shape, dtype=torch.float32)
        summed.index_put_((sentence, word), torch.log_softmax(window[row, position].float(), -1), accumulate=True)
        return torch.cat([words.float(), summed], 1)

    def loss_sum(self, logits: torch.Tensor, targets: Sequence) -> torch.Tensor:
        all_pieces = any(isinstance(t, tuple) for t in targets)
        width = logits.shape[1] // 2 if all_pieces else logits.shape[1]
        target = torch.full((logits.shape[0], width), -100, dtype=torch.long)
        piece_target = torch.zeros_like(target)
        for i, tags in enumerate(targets):
            words, rest = tags if isinstance(tags, tuple) else (tags, None)
            target[i, :len(words)] = torch.as_tensor(list(words), dtype=torch.long)
            if rest is not None:
                piece_target[i, :len(rest)] = torch.as_tensor(list(rest), dtype=torch.long)
        per_word = nn.functional.cross_entropy(logits[:, :width].float().transpose(1, 2), target, reduction="none")
        if all_pieces:  # minus the summed log-probability of each word's sub-token tag (0 for a one-piece word)
            per_word = per_word - logits[:, width:].float().gather(-1, piece_target[..., None])[..., 0]
        counts = (target != -100).sum(1).clamp(min=1)
        return (per_word.sum(1) / counts).sum()

    def gather(self, pieces: Sequence[tuple[list[int], torch.Tensor]], count: int) -> torch.Tensor:
        width = max((logits.shape[1] for _, logits in pieces), default=0)
        out = torch.zeros(count, width, pieces[0][1].shape[-1] if pieces else 0)
        for index, logits in pieces:
            out[index, :logits.shape[1]] = logits.float()
        return out

    # -- evaluation and report ---------------------------------------------------------------------------
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1)

    def metrics(self, logits: torch.Tensor, targets: Sequence[Sequence[int]], vocabulary: T.TagSet) -> dict:
        from .token_metrics import scores

        targets = [list(t[0] if isinstance(t, tuple) else t) for t in targets]
        predicted = [logits[i, :len(t)].argmax(-1).tolist() for i, t in enumerate(targets)]
        result = scores(targets, predicted, vocabulary)
        result["loss"] = float(self.loss_sum(logits, targets)) / len(targets) if targets else float("nan")
        return result

    def final_evaluation(self, model: nn.Module, tokenizer, datasets: Datasets, config, say) -> dict:
        """How many sentences of each split needed more than one window (the report's ``windowed_sentences``)."""
        counts = {}
        for split in ("train", "dev", "test"):
            sentences = getattr(datasets, split)
            if sentences:
                features = self.encode(tokenizer, sentences, config.max_length)
                counts[split] = self.encoding_report(features)["windowed_sentences"]
        if any(c["windowed"] for c in counts.values()):
            say("sentences longer than max_length, split into overlapping windows: "
                + ", ".join(f"{split} {c['windowed']} of {c['sentences']}" for split, c in counts.items()))
        return {"windowed_sentences": counts}

    def encoding_report(self, features: Sequence[dict]) -> dict:
        windowed = sum(len(f["spans"]) > 1 for f in features)
        return {"windowed_sentences": {"sentences": len(features), "windowed": windowed}}

    def summary(self, result: dict) -> str:
        line = (f"entity F1 {result['f1']:.4f}   precision {result['precision']:.4f}   recall {result['recall']:.4f}   "
                f"macro-F1 {result['macro_f1']:.4f}   word accuracy {result['accuracy']:.4f}")
        windowed = result.get("windowed_sentences")  # peftkit eval: how the file's sentences were encoded
        if windowed:
            line += f"   windowed sentences {windowed['windowed']} of {windowed['sentences']}"
        return line

    def plots(self, report: dict, vocabulary: T.TagSet, directory: Path) -> None:
        from .classification_metrics import plot_confusion

        for split in ("dev", "test"):
            if split in report:
                plot_confusion(report[split]["confusion_matrix"], report[split]["entity_types"],
                               directory / f"confusion_{split}.png", f"entity types ({split})")

    def settings(self, config) -> dict:
        return {"tag_scheme": config.tag_scheme, "strict_tags": config.strict_tags,
                "label_all_tokens": config.label_all_tokens}

    def vocabulary_settings(self, vocabulary: T.TagSet) -> dict:
        return {"tag_scheme": vocabulary.scheme, "strict_tags": vocabulary.strict}  # tags.json: as detected in training

    def info(self, report: dict) -> dict:
        return {f"{split} entity F1": round(report[split]["f1"], 4) for split in ("dev", "test") if split in report}

    # -- prediction output -------------------------------------------------------------------------------
    def prediction_rows(self, examples: Sequence[T.Sentence], outputs: torch.Tensor, vocabulary: T.TagSet) -> list[dict]:
        rows = []
        for i, sentence in enumerate(examples):
            probs = outputs[i, :len(sentence.words)]
            best, chosen = probs.argmax(-1).tolist(), probs.max(-1).values
            tags = [vocabulary.names[j] for j in best]
            text, offsets = sentence.surface()
            spans = []
            for kind, a, b in T.entities(tags, vocabulary.scheme, vocabulary.strict):
                start, end = offsets[a][0], offsets[b - 1][1]
                spans.append({"text": text[start:end], "type": kind, "start": start, "end": end,
                              "score": round(float(chosen[a:b].mean()), 6)})
            rows.append({"text": text, "entities": spans, "tokens": list(sentence.words), "tags": tags})
        return rows

    def write_predictions(self, path: Path, rows: list[dict], vocabulary: T.TagSet) -> None:
        """``.jsonl``/``.json``: the rows as JSON lines; any other name: CoNLL (``token<TAB>tag``)."""
        from ..atomic import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                for row in rows:
                    if path.suffix.lower() in (".jsonl", ".json"):
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    else:
                        handle.write("".join(f"{w}\t{t}\n" for w, t in zip(row["tokens"], row["tags"])) + "\n")

        atomic_write(path, write)

    # -- serving (schema and base model: token_serve.py) ------------------------------------------------
    def serving_base(self, model_path: str, options: dict) -> tuple[nn.Module, list[str] | None, dict]:
        from .token_serve import serving_base

        model, labels = serving_base(model_path)
        return model, labels, {}

    def serve_schema(self) -> ServeSchema:
        from .token_serve import TagRequest, TagResponse

        return ServeSchema("/v1/tag", TagRequest, TagResponse, verb="tag")

    def request_rows(self, request) -> list[tuple[str]]:
        return [(text,) for text in request.texts]

    def serve_row(self, logits: torch.Tensor, names: list[str], inputs: tuple, vocabulary=None) -> dict:
        """The ``peftkit predict --text`` row of one text: its words' logits (a mixed batch pads heads to the widest
        and sentences to the longest: both cut off here) through ``prediction_rows``."""
        sentence = T.split_words(inputs[0])
        if vocabulary is None:  # a base model with a trained head: its tags, the scheme read from their prefixes
            scheme = "BIOES" if any(name[:2] in ("E-", "S-") for name in names) else "IOB2"
            vocabulary = T.TagSet(list(names), scheme, strict=False)
        probs = self.outputs(logits[:len(sentence.words), :len(names)])
        return self.prediction_rows([sentence], probs[None], vocabulary)[0]

    def response(self, adapter: str, outputs: list[dict], names: list[str], vocabulary=None):
        from .token_serve import TagResponse

        return TagResponse(adapter=adapter, results=outputs)

    def adapter_settings(self, stored_config: dict | None) -> dict:
        if stored_config is None:
            raise DataError(f"a token-classification adapter is served from its run folder: {self.vocabulary_file} "
                            "(the tags, their scheme) is missing; point the server at the run folder")
        return {}

    def shared_head(self, stored_config: dict, model_path: str) -> str:
        return "token"

    def served_metrics(self, report: dict) -> dict:
        return {f"{split}_f1": round(report[split]["f1"], 4) for split in ("dev", "test") if split in report}

    # -- merged folders ------------------------------------------------------------------------------------
    def write_merged(self, folder: Path, plain: nn.Module, vocabulary: T.TagSet, config, run_path: Path,
                     tokenizer) -> dict:
        plain.config.id2label = dict(enumerate(vocabulary.names))
        plain.config.label2id = {name: i for i, name in enumerate(vocabulary.names)}
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        marker = {"format": "AutoModelForTokenClassification", **vocabulary.to_dict(), "base_model": config.model,
                  "merged_from": str(run_path), "method": config.method, "max_length": config.max_length}
        (folder / "README.md").write_text(
            f"# Merged model: a transformers token classifier\n\nMerged from the peftkit run `{run_path}` (method "
            f"`{config.method}`, base model `{config.model}`); nothing here needs peftkit.\n\n"
            f"- `config.json` + `model.safetensors`: a standard `{type(plain).__name__}` with {len(vocabulary)} "
            f"{vocabulary.scheme} tags in `id2label`. `AutoModelForTokenClassification.from_pretrained(this folder)` "
            "gives the run's logits; the run tags each word by its first sub-token.\n"
            f"- tokenizer files; the run cut sentences into windows of {config.max_length} tokens.\n"
            "- `peftkit_head.json`: the tags, scheme and settings read by `peftkit predict/eval --run`.\n",
            encoding="utf-8")
        return marker

    def open_merged(self, folder: Path, marker: dict) -> tuple[dict, T.TagSet]:
        values = {key: marker[key] for key in ("method", "max_length") if key in marker}
        values.update(tag_scheme=marker.get("scheme", "IOB2"), strict_tags=bool(marker.get("strict", True)))
        return values, T.TagSet.from_dict(marker)

    def merged_model(self, folder: Path, config, vocabulary: T.TagSet) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(folder)
        if model.config.num_labels != len(vocabulary):
            raise DataError(f"{folder}: the model has {model.config.num_labels} outputs but the marker lists "
                            f"{len(vocabulary)} tags; merge the run again")
        return model


register_task(TokenClassification())
