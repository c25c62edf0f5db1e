"""Extractive QA: SQuAD reading, article split, passage windows and span recovery, SQuAD v1.1 scoring."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.tasks.batches import task_tokenizer
from lmforge.tasks.config import resolve_task_config
from lmforge.tasks.qa import (QAExample, best_answers, encode_qa, exact_match, load_span_task, normalize_answer,
                              read_squad, split_by_article, squad_scores, token_f1)

# ../shared/data beside the checkout (or beside the worktrees' folder)
DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
            Path("/nonexistent"))
SQUAD_DEV = DATA / "squad-v1.1" / "dev-v1.1.json"
PASSAGE = ("Super Bowl 50 was an American football game to determine the champion of the National Football League "
           "for the 2015 season. The American Football Conference champion Denver Broncos defeated the National "
           "Football Conference champion Carolina Panthers 24 to 10 to earn their third Super Bowl title. The game "
           "was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
           "California.")


@pytest.fixture(scope="module", params=["bert", "gpt"])
def tokenizer(request):
    """A small trained tokenizer of either family, with its task template (so windows carry its special tokens)."""
    kind = "wordpiece" if request.param == "bert" else "bpe"
    tok = train_tokenizer([PASSAGE] * 20, TokenizerConfig(kind=kind, vocab_size=1000, lowercase=False),
                          family=request.param, show_progress=False)
    return task_tokenizer(tok, request.param, 10_000)


@pytest.mark.parametrize("text,normal", [
    ("The Denver Broncos", "denver broncos"),
    ("  an Apple a   day\tkeeps\nthe doctor away. ", "apple day keeps doctor away"),
    ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("Levi's Stadium!", "levis stadium"),  # punctuation removed, not replaced by a space
    ("A-ha", "aha"),
    ("24\u201310", "24\u201310"),  # an en dash is not in string.punctuation, as in the official script
    ("THE", ""),
])
def test_normalize_answer_cases(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    golds = ["Denver Broncos", "The Denver Broncos", "Broncos"]
    assert exact_match("the denver broncos.", golds) == 1.0
    assert exact_match("Denver", golds) == 0.0
    # "denver broncos team" vs "denver broncos": P 2/3, R 1 -> 0.8; vs "broncos": P 1/3, R 1 -> 0.5
    assert token_f1("Denver Broncos team", golds) == pytest.approx(0.8)
    assert token_f1("Carolina", golds) == 0.0
    assert token_f1("", golds) == 0.0
    assert (exact_match("The", ["the"]), token_f1("The", ["the"])) == (1.0, 0.0)  # official v1.1: no tokens, no F1
    # repeated tokens count once per occurrence: "a b b" vs "b b c" -> common 2, P 2/3, R 2/3
    assert token_f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
    examples = [QAExample(str(i), "t", "q", "c", tuple(g), 0, "s") for i, g in enumerate([golds, ["Santa Clara"]])]
    scores = squad_scores(["Denver Broncos team", "Santa Clara, California"], examples)
    assert scores["exact_match"] == 0.0
    assert scores["span_f1"] == pytest.approx(100 * (0.8 + 0.8) / 2)


def _squad(articles):
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [
        {"context": context, "qas": [{"id": f"{title}-{k}", "question": q,
                                      "answers": [{"text": t, "answer_start": s} for t, s in answers]}
                                     for k, (q, answers) in enumerate(qas)]}
        for context, qas in paragraphs]} for title, paragraphs in articles]}


def test_answer_with_wrong_offset_is_skipped_with_warning_or_refused_when_strict(tmp_path, caplog):
    context = "Denver Broncos defeated Carolina Panthers."
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad([("A", [(context, [
        ("Who won?", [("Denver Broncos", 0), ("Broncos", 3)]),  # the second offset is wrong
        ("Who lost?", [("Carolina Panthers", 5)]),  # its only answer is wrong: the question goes
    ])])])))
    with caplog.at_level(logging.WARNING):
        data = read_squad(path)
    assert (data.skipped_answers, data.skipped_questions) == (2, 1)
    assert [(e.id, e.answers, e.answer_start) for e in data.examples] == [("A-0", ("Denver Broncos",), 0)]
    assert "skipped 2 answer(s)" in caplog.text
    with pytest.raises(LmforgeError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[1\]: answer_start 3"):
        read_squad(path, strict=True)
    path.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(LmforgeError, match=r"data\[0\]\.paragraphs\[0\]: no 'context'"):
        read_squad(path)


def test_split_by_article_is_deterministic_and_never_cuts_an_article():
    if not SQUAD_DEV.is_file():
        pytest.skip("the SQuAD dev file is not in ../shared/data")
    data = read_squad(SQUAD_DEV)
    assert len(data.examples) == 10_570 and data.skipped_answers == 0
    train, dev = split_by_article(data.examples, 8, seed=0)
    assert len(train) + len(dev) == 10_570
    train_titles, dev_titles = {e.title for e in train}, {e.title for e in dev}
    assert len(dev_titles) == 8 and len(train_titles) == 40 and not train_titles & dev_titles
    again, dev_again = split_by_article(data.examples, 8, seed=0)
    assert [e.id for e in dev_again] == [e.id for e in dev]
    assert {e.title for e in split_by_article(data.examples, 8, seed=1)[1]} != dev_titles
    with pytest.raises(LmforgeError, match="held_out_articles"):
        split_by_article(data.examples, 48, seed=0)


def _spans(context):
    """Every span of one to three whole words (punctuation stripped) as (text, start)."""
    words = [(m.group(0).strip(".,"), m.start()) for m in __import__("re").finditer(r"\S+", context)]
    return [(context[words[i][1]:words[j][1] + len(words[j][0])], words[i][1])
            for i in range(len(words)) for j in range(i, min(i + 3, len(words)))]


def test_windows_find_every_answer_including_those_across_window_edges(tokenizer):
    examples = [QAExample(str(k), "t", "Who won the game?", PASSAGE, (text,), start, "s")
                for k, (text, start) in enumerate(_spans(PASSAGE))]
    max_length, stride = 32, 12
    windows = encode_qa(tokenizer, examples, max_length, stride)
    question = tokenizer.encode("Who won the game?", add_special_tokens=False).ids
    straddling = 0
    for k, example in enumerate(examples):
        mine = [w for w in windows if w.example == k]
        assert len(mine) > 3 and all(len(w.ids) <= max_length for w in mine)
        for w in mine:
            first_text = [i for i, y in zip(w.ids, w.type_ids) if y == 0]  # the question whole, in every window
            assert any(first_text[j:j + len(question)] == question for j in range(len(first_text)))
            covered = [o for o in w.offsets if o is not None]
            answer_end = example.answer_start + len(example.answers[0])
            inside = covered[0][0] <= example.answer_start and covered[-1][1] >= answer_end
            if inside:
                assert PASSAGE[w.offsets[w.start][0]:w.offsets[w.end][1]].strip() == example.answers[0]
            else:
                assert (w.start, w.end) == (0, 0)
                partly = (covered[0][0] <= example.answer_start < covered[-1][1]
                          or covered[0][0] < answer_end <= covered[-1][1])
                straddling += partly
        assert any(w.start > 0 for w in mine)  # answers of <= 3 words always fit one window whole
        # Consecutive windows overlap by exactly `stride` passage tokens.
        for a, b in zip(mine, mine[1:]):
            pa = [t for t, o in zip(a.ids, a.offsets) if o is not None]
            pb = [t for t, o in zip(b.ids, b.offsets) if o is not None]
            assert pa[-stride:] == pb[:stride]
    assert straddling > 20  # many answers cross a window edge
    # Logits that point at the answer in the windows holding it whole, and noise elsewhere, recover its text.
    rng = np.random.default_rng(0)
    starts, ends = [], []
    for w in windows:
        s, e = rng.normal(size=len(w.ids) + 3), rng.normal(size=len(w.ids) + 3)  # +3: padding after the window
        if w.start > 0:
            s[w.start] += 20
            e[w.end] += 20
        starts.append(s)
        ends.append(e)
    predicted = best_answers(windows, examples, starts, ends, max_answer_length=30)
    assert predicted == [e.answers[0] for e in examples]
    # An answer that normalises to nothing ("the") scores EM 1 but F1 0, as in the official script.
    empty = sum(normalize_answer(e.answers[0]) == "" for e in examples)
    assert empty > 0
    assert squad_scores(predicted, examples) == pytest.approx(
        {"exact_match": 100.0, "span_f1": 100.0 * (len(examples) - empty) / len(examples)})


def test_best_span_respects_order_and_max_length(tokenizer):
    example = QAExample("0", "t", "Who?", PASSAGE, ("Denver Broncos",), PASSAGE.index("Denver Broncos"), "s")
    window, = encode_qa(tokenizer, [example], 512, 0)
    n = len(window.ids)
    s, e = np.full(n, -100.0), np.full(n, -100.0)
    s[window.start], e[window.end] = 5.0, 5.0
    s[window.end + 40] = 50.0  # a start after the best end, and 40 tokens from any strong end
    e[window.start - 1] = 50.0  # an end before the best start
    assert best_answers([window], [example], [s], [e], max_answer_length=30) == ["Denver Broncos"]
    s[1] = 1000.0  # the question's tokens are never an answer
    assert best_answers([window], [example], [s], [e], max_answer_length=30) == ["Denver Broncos"]


def test_question_too_long_for_the_windows_is_refused(tokenizer):
    example = QAExample("0", "t", " ".join(["Denver"] * 30), PASSAGE, ("Denver",), PASSAGE.index("Denver"), "here")
    with pytest.raises(LmforgeError, match=r"here: the question is \d+ tokens, too long"):
        encode_qa(tokenizer, [example], 32, 8)


def test_shipped_recipe_holds_out_eight_articles():
    if not SQUAD_DEV.is_file():
        pytest.skip("the SQuAD dev file is not in ../shared/data")
    config = resolve_task_config("qa-squad", overrides=[f"path={SQUAD_DEV.parent}"])
    assert (config.kind, config.stride, config.max_answer_length, config.select_metric) == ("span", 128, 30, "span_f1")
    task = load_span_task(config)
    assert (len(task.train), len(task.dev)) == (8_117, 2_453)
    assert len({e.title for e in task.dev}) == 8 and not {e.title for e in task.dev} & {e.title for e in task.train}
    with pytest.raises(LmforgeError, match="held_out_articles takes the dev split from the train file"):
        resolve_task_config("qa-squad", overrides=[f"path={SQUAD_DEV.parent}", "dev_file=dev-v1.1.json"])


def test_a_question_without_answer_is_encoded_for_prediction(tokenizer):
    gold = QAExample("0", "t", "Who won?", PASSAGE, ("Denver Broncos",), PASSAGE.index("Denver Broncos"), "s")
    open_question = QAExample("1", "t", "Who won?", PASSAGE, (), 0, "predict")
    trained, asked = encode_qa(tokenizer, [gold], 32, 12), encode_qa(tokenizer, [open_question], 32, 12)
    assert [w.ids for w in asked] == [w.ids for w in trained]
    assert all((w.start, w.end) == (0, 0) for w in asked) and any(w.start > 0 for w in trained)
    starts = [np.eye(len(w.ids))[t.start] * (t.start > 0) for w, t in zip(asked, trained)]
    ends = [np.eye(len(w.ids))[t.end] * (t.start > 0) for w, t in zip(asked, trained)]
    assert best_answers(asked, [open_question], starts, ends) == ["Denver Broncos"]
