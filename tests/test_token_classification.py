"""Token classification (NER): reading CoNLL/JSONL and tag schemes, span decoding, sub-token alignment and windows,
character offsets of raw text; every check on hand-built sentences with known answers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from peftkit.tasks import get_task
from peftkit.tasks import token_data as T
from peftkit.tasks.data import DataError
from peftkit.train.config import RunConfig

from workflow_helpers import tiny_model_dir

TASK = get_task("token-classification")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path_factory.mktemp("tok")))


def _config(tmp_path, train: str, dev: str | None = None, **extra) -> RunConfig:
    (tmp_path / "train.conll").write_text(train, encoding="utf-8")
    values = {"task": "token-classification", "train_file": str(tmp_path / "train.conll"), **extra}
    if dev is not None:
        (tmp_path / "dev.conll").write_text(dev, encoding="utf-8")
        values["dev_file"] = str(tmp_path / "dev.conll")
    return RunConfig.model_validate(values)


TRAIN = "-DOCSTART-\tO\n\nAlice\tB-PER\nSmith\tI-PER\nin\tO\nParis\tB-LOC\n\nhello\tO\nBob B-PER\n"


# ------------------------------------------------------------------------------------------------ reading
def test_conll_tab_and_space_separated_and_jsonl_read_alike(tmp_path):
    (tmp_path / "a.conll").write_text("-DOCSTART- -X- O\n\nAlice\tB-PER\nruns\tO\n\n\nParis B-LOC\n", encoding="utf-8")
    rows = [{"tokens": ["Alice", "runs"], "tags": ["B-PER", "O"]}, {"tokens": ["Paris"], "tags": ["B-LOC"]}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    conll, jsonl = T.read_sentences(tmp_path / "a.conll"), T.read_sentences(tmp_path / "a.jsonl")
    assert [(s.words, s.tags) for s in conll] == [(s.words, s.tags) for s in jsonl] == \
        [(("Alice", "runs"), ("B-PER", "O")), (("Paris",), ("B-LOC",))]
    assert [s.lines for s in conll] == [(3, 4), (7,)]  # -DOCSTART- skipped, lines counted in the file


def test_a_line_without_tag_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"train\.conll, line 8: 'hello' has no tag"):
        TASK.load_datasets(_config(tmp_path, TRAIN.replace("hello\tO", "hello")))
    (tmp_path / "bad.jsonl").write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: 2 tokens but 1 tags"):
        T.read_sentences(tmp_path / "bad.jsonl")


def test_invalid_transition_is_an_error_when_strict_and_read_leniently_otherwise(tmp_path):
    bad = "Alice\tB-PER\nin\tO\nSmith\tI-PER\n\nBob\tB-LOC\n"
    with pytest.raises(DataError, match=r"train\.conll, line 3: tag 'I-PER' after 'O' is not a valid IOB2 transition"):
        TASK.load_datasets(_config(tmp_path, bad, dev="Bob\tB-PER\n"))
    data = TASK.load_datasets(_config(tmp_path, bad, dev="Bob\tB-PER\n", strict_tags=False))
    assert data.vocabulary.strict is False and len(data.train) == 2


def test_dev_tag_unseen_in_train_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"dev\.conll, line 2: tag 'B-ORG' does not occur in the training data"):
        TASK.load_datasets(_config(tmp_path, TRAIN, dev="IBM\tO\nIBM\tB-ORG\n"))


def test_schemes_detected_or_checked_against_the_key(tmp_path):
    bioes = "Alice\tB-PER\nSmith\tE-PER\nin\tO\nParis\tS-LOC\n\nBob\tS-PER\n"
    data = TASK.load_datasets(_config(tmp_path, bioes, dev="Bob\tS-PER\n"))
    assert data.vocabulary.scheme == "BIOES"
    assert data.vocabulary.names == ["O", "S-LOC", "B-PER", "E-PER", "S-PER"]  # O, then by type and prefix
    with pytest.raises(DataError, match=r"line 2: tag 'E-PER' is not a IOB2 tag.*tag_scheme: BIOES"):
        TASK.load_datasets(_config(tmp_path, bioes, dev="Bob\tS-PER\n", tag_scheme="IOB2"))
    with pytest.raises(DataError, match=r"line 2: 'B-PER' is not closed"):
        TASK.load_datasets(_config(tmp_path, "Alice\tB-PER\nin\tO\n\nBob\tS-PER\n", dev="Bob\tS-PER\n"))


# ----------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("tags, scheme, strict, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], "IOB2", True, [("PER", 0, 2), ("LOC", 3, 4)]),
    (["O", "I-PER", "I-PER", "B-LOC", "B-LOC"], "IOB2", True, [("LOC", 3, 4), ("LOC", 4, 5)]),  # I- after O: no entity
    (["O", "I-PER", "I-PER", "B-LOC"], "IOB2", False, [("PER", 1, 3), ("LOC", 3, 4)]),  # conlleval opens one
    (["B-PER", "I-LOC", "O"], "IOB2", True, [("PER", 0, 1)]),  # a type change is not a continuation
    (["B-PER", "I-PER", "E-PER", "S-LOC", "O"], "BIOES", True, [("PER", 0, 3), ("LOC", 3, 4)]),
    (["B-PER", "I-PER", "O", "S-LOC", "E-LOC"], "BIOES", True, [("LOC", 3, 4)]),  # unclosed B-, stray E-: dropped
])
def test_bio_and_bioes_decoding(tags, scheme, strict, expected):
    assert T.entities(tags, scheme, strict) == expected


# ------------------------------------------------------------------------------------------------ offsets
def test_raw_text_words_and_offsets_round_trip_with_unicode():
    text = "  Zoë Saldaña flew to São-Paulo (Brasil) in 2024, didn't she? 🙂 Ünïcödé—ok "
    sentence = T.split_words(text)
    assert all(text[a:b] == word for word, (a, b) in zip(sentence.words, sentence.offsets))
    assert sentence.words[:6] == ("Zoë", "Saldaña", "flew", "to", "São-Paulo", "(")
    assert "didn't" in sentence.words and "🙂" in sentence.words and "—" in sentence.words
    # predicted spans come back as exact character offsets of the input
    tags = T.TagSet(["O", "B-PER", "I-PER", "B-LOC"])
    wanted = {0: 1, 1: 2, 4: 3}  # Zoë Saldaña = PER, São-Paulo = LOC
    probs = torch.full((1, len(sentence.words), 4), 0.0)
    for i in range(len(sentence.words)):
        probs[0, i, wanted.get(i, 0)] = 0.9 if i != 1 else 0.7
    row = TASK.prediction_rows([sentence], probs, tags)[0]
    assert row["entities"] == [
        {"text": "Zoë Saldaña", "type": "PER", "start": 2, "end": 13, "score": pytest.approx(0.8)},
        {"text": "São-Paulo", "type": "LOC", "start": 22, "end": 31, "score": pytest.approx(0.9)}]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in row["entities"])


# ---------------------------------------------------------------------------------- alignment and windows
class Echo(torch.nn.Module):
    """A stand-in model whose logits at each position are (input id, row, position): shows which sub-token of
    which window every word was read from."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        rows, width = input_ids.shape
        row = torch.arange(rows).unsqueeze(1).expand(rows, width)
        position = torch.arange(width).unsqueeze(0).expand(rows, width)
        return SimpleNamespace(logits=torch.stack([input_ids, row, position], -1).float())


def _stitched(tokenizer, sentences, max_length):
    features = TASK.encode(tokenizer, sentences, max_length)
    batch = TASK.collate(tokenizer, features)
    return features, batch, TASK.logits(TASK.forward(Echo(), batch))


def test_first_sub_token_of_each_word_carries_its_label(tokenizer):
    words = ("@paulwalk", "loves", "Zürich", "!")
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert len(pieces[0]) == 3  # "@", "paul", "##walk": a word of several sub-tokens
    features, batch, logits = _stitched(tokenizer, [T.Sentence(words, None, (1, 1, 1, 1))], 32)
    flat = [i for p in pieces for i in p]
    assert batch["input_ids"].tolist() == [[tokenizer.cls_token_id, *flat, tokenizer.sep_token_id]]
    assert logits[0, :, 0].long().tolist() == [p[0] for p in pieces]  # the first sub-token of each word
    assert logits[0, :, 2].long().tolist() == [1, 4, 5, 6]  # its position after [CLS]
    # the loss sees one target per word: a wrong tag on the 2nd sub-token position cannot exist
    loss = TASK.loss_sum(torch.zeros(1, 4, 3, requires_grad=True), [[0, 1, 2, 0]])
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_windows_cover_every_word_and_each_word_is_read_where_it_has_most_context():
    spans, best = T.windows([1] * 10, budget=8)  # overlap: a quarter of the window, 2 sub-tokens
    assert spans == [(0, 8), (6, 10)]
    assert best == [0] * 7 + [1] * 3  # word 6: 1 token of context left in window 0, none in window 1
    spans, best = T.windows([3, 1, 4, 2, 2, 5, 1], budget=6)
    assert all(any(s <= w < e for s, e in spans) for w in range(7)) and spans[0][0] == 0 and spans[-1][1] == 7
    assert all(sum([3, 1, 4, 2, 2, 5, 1][s:e]) <= 6 for s, e in spans)
    assert T.windows([9], budget=4) == ([(0, 1)], [0])  # a word longer than a window still gets one


def test_long_sentence_is_split_into_windows_and_stitched_back_without_dropping_words(tokenizer):
    words = tuple(f"w{i}" for i in range(10))  # "w", "##i": two sub-tokens per word
    sentence = T.Sentence(words, None, tuple(range(1, 11)))
    short = T.Sentence(("hi",), None, (1,))
    features, batch, logits = _stitched(tokenizer, [sentence, short], max_length=10)  # 8 sub-tokens per window
    assert [f["spans"] for f in features] == [[(0, 4), (3, 7), (6, 10)], [(0, 1)]]
    assert batch["input_ids"].shape[0] == 4  # three windows + the short sentence
    first = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    assert logits[0, :, 0].long().tolist() == first  # every word, in order
    assert logits[0, :, 1].long().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # most context (ties: the earlier)
    assert logits[1, 0, 0].item() == tokenizer("hi", add_special_tokens=False)["input_ids"][0]
    assert logits[1, 1:].abs().sum() == 0  # padding words of the short sentence


# ------------------------------------------------------------------------------------------ label_all_tokens
class Fixed(torch.nn.Module):
    """A stand-in model with fixed random logits over 5 tags at every position."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        generator = torch.Generator().manual_seed(0)
        return SimpleNamespace(logits=torch.randn(*input_ids.shape, 5, generator=generator))


def test_label_all_tokens_labels_every_sub_token_and_predictions_read_the_first(tokenizer, tmp_path):
    words = ("@paulwalk", "loves", "Kraków-Saldaña", "!")
    pieces = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    assert pieces[0] == 3 and pieces[2] == 4 and pieces[1] == pieces[3] == 1  # two words of several sub-tokens
    train = ("".join(f"{w}\t{t}\n" for w, t in zip(words, ("B-PER", "O", "B-LOC", "O")))
             + "\nBob\tB-PER\nSmith\tI-PER\n\nNew\tB-LOC\nYork\tI-LOC\n")
    dev = "Ann\tB-PER\nin\tO\nRome\tB-LOC\nCity\tI-LOC\n"
    plain = TASK.load_datasets(_config(tmp_path, train, dev=dev))
    data = TASK.load_datasets(_config(tmp_path, train, dev=dev, label_all_tokens=True))
    tags = data.vocabulary
    assert tags.names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert data.train[0].piece_tags == ("I-PER", "O", "I-LOC", "O") and data.dev[0].piece_tags is None
    O, B_LOC, I_LOC, B_PER, I_PER = range(5)
    targets = TASK.targets(data.train[:1], tags, "train")
    assert targets == [([B_PER, O, B_LOC, O], [I_PER, O, I_LOC, O])]
    assert TASK.targets(data.dev, tags, "dev") == [[B_PER, O, B_LOC, I_LOC]]  # evaluation: one tag per word

    def logits(sentences):
        batch = TASK.collate(tokenizer, TASK.encode(tokenizer, sentences, 32))
        return TASK.logits(TASK.forward(Fixed(), batch)), Fixed()(batch["input_ids"]).logits[0]

    stitched, window = logits(data.train[:1])
    # the loss: every sub-token's cross-entropy against its tag (B-PER I-PER I-PER | O | B-LOC I-LOC ... | O), summed
    # over the sentence and divided by its 4 words
    per_piece = [B_PER, I_PER, I_PER, O, B_LOC, *[I_LOC] * (pieces[2] - 1), O]
    expected = torch.nn.functional.cross_entropy(window[1:1 + len(per_piece)], torch.tensor(per_piece),
                                                 reduction="sum") / 4
    assert TASK.loss_sum(stitched, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    # predictions read the first sub-token of each word, as without the option
    first, _ = logits(plain.train[:1])
    assert first.shape[1] == 4 and torch.equal(stitched[:, :4], first)
    assert TASK.metrics(stitched, targets, tags)["accuracy"] == TASK.metrics(first, [targets[0][0]], tags)["accuracy"]


def test_label_all_tokens_continuation_tags_per_scheme():
    iob2 = T.TagSet(["O", "B-PER", "I-PER", "B-LOC"])
    assert [iob2.continuation(t) for t in ("B-PER", "I-PER", "O", "B-LOC")] == ["I-PER", "I-PER", "O", "B-LOC"]
    bioes = T.TagSet(["O", "B-PER", "I-PER", "E-PER", "S-PER"], "BIOES")
    assert [bioes.continuation(t) for t in ("B-PER", "I-PER", "E-PER", "S-PER")] == ["I-PER", "I-PER", "E-PER", "S-PER"]
    with pytest.raises(ValueError, match="label_all_tokens is for task token-classification"):
        RunConfig.model_validate({"train_file": "x.csv", "label_all_tokens": True})


# --------------------------------------------------------------------------------------------- eval / info
def test_eval_reports_windowed_sentences_and_info_shows_the_detected_scheme(tmp_path, capsys):
    from peftkit.cli import main
    from peftkit.train.run import Run

    from serve_tag_helpers import make_tag_run

    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER"]
    run = make_tag_run(tmp_path / "run", tiny_model_dir(tmp_path), seed=1, tags=tags, max_length=8)
    (run / "tags.json").write_text(json.dumps({"tags": tags, "scheme": "BIOES", "strict": True}))  # as detected
    data = tmp_path / "dev.conll"  # 12 words need windows of 6 sub-tokens; "Bob runs" fits in one
    long = ["Alice", "Smith"] + ["and"] * 9 + ["Bob"]
    data.write_text("".join(f"{w}\t{t}\n" for w, t in zip(long, ["B-PER", "E-PER"] + ["O"] * 9 + ["S-PER"]))
                    + "\nBob\tS-PER\nruns\tO\n", encoding="utf-8")
    assert Run(run).evaluate(data)["windowed_sentences"] == {"sentences": 2, "windowed": 1}
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(data)]) == 0
    assert "windowed sentences 1 of 2" in capsys.readouterr().out
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "tag_scheme: BIOES" in out and "auto" not in out  # the run config says auto; tags.json what was detected
