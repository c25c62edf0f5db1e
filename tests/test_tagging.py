"""Token classification data: CoNLL / JSONL readers, subword label alignment, windows, entity scores vs seqeval."""

import json
from pathlib import Path

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB1, IOB2, IOBES

from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.tasks.batches import IGNORE_INDEX
from lmforge.tasks.config import TaskConfig, recipe_finetune, resolve_task_config
from lmforge.tasks.tagging import (TaggedSentence, encode_tagged, entities, entity_scores, load_tagging_task,
                                   merge_windows, read_conll, read_tagged_jsonl, split_words, tag_ids, tag_set,
                                   tagging_metrics)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP B-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""

WORDS = ("the european commission said on thursday it disagreed with german advice to consumers "
         "to shun british lamb until scientists determine whether mad cow disease can be transmitted "
         "to sheep peter blackburn brussels").split()


@pytest.fixture(scope="module")
def tokenizer():
    """A small WordPiece trained here: most words split into several subwords."""
    text = " ".join(WORDS)
    return train_tokenizer([text] * 20, TokenizerConfig(kind="wordpiece", vocab_size=90, lowercase=True),
                           family="bert", show_progress=False)


def test_conll_reader_understands_docstart_and_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    sentences = read_conll(path, word_column=0, tag_column=3)
    assert [s.words for s in sentences] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                            ["BRUSSELS", "1996-08-22"]]
    assert sentences[1].tags == ["B-PER", "I-PER"]
    assert sentences[0].source == f"{path}:3"
    assert read_conll(path) == sentences  # the tag column defaults to the last one
    chunks = read_conll(path, word_column=0, tag_column=2)
    assert chunks[0].tags == ["B-NP", "B-VP", "B-NP", "I-NP", "O"]


def test_conll_line_without_tag_column_names_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL.replace("call NN I-NP O", "call"))
    with pytest.raises(LmforgeError, match=rf"{path}:6: .*'call'.* no tag column"):
        read_conll(path)
    with pytest.raises(LmforgeError, match=rf"{path}:3: .*no tag column"):
        read_conll(tmp_path / "train.txt", tag_column=4)


def test_jsonl_reader_and_length_mismatch(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}) + "\n\n"
                    + json.dumps({"tokens": ["Peter"], "tags": ["B-PER"]}) + "\n")
    sentences = read_tagged_jsonl(path)
    assert [(s.words, s.tags) for s in sentences] == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    assert sentences[1].source == f"{path}:3"
    path.write_text(json.dumps({"tokens": ["EU", "rejects"], "tags": ["B-ORG"]}) + "\n")
    with pytest.raises(LmforgeError, match=rf"{path}:1: 2 words .* but 1 tags"):
        read_tagged_jsonl(path)


def test_tag_outside_label_set_names_its_line(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(CONLL)
    train_labels = ["O", "B-ORG", "B-MISC", "B-PER", "I-PER"]
    with pytest.raises(LmforgeError, match=rf"{path}:14: tag 'B-LOC' is not in the label set"):
        tag_ids(read_conll(path), train_labels)
    assert tag_set(read_conll(path)) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]


def _sentences(rng, count, low, high):
    tags = ["O", "B-PER", "I-PER", "B-LOC"]
    return [TaggedSentence([WORDS[i] for i in rng.integers(0, len(WORDS), n)], [tags[j] for j in rng.integers(0, 4, n)],
                           f"s{k}") for k, n in enumerate(rng.integers(low, high, count))]


def test_first_subword_label_alignment_round_trips(tokenizer):
    rng = np.random.default_rng(0)
    sentences = _sentences(rng, 20, 1, 12)
    labels = tag_set(sentences)
    ids = tag_ids(sentences, labels)
    windows = encode_tagged(tokenizer, sentences, ids, max_length=512, stride=0)
    assert len(windows) == len(sentences)  # short sentences: one window each
    for window, sentence, tags in zip(windows, sentences, ids):
        assert window.ids[0] == tokenizer.token_to_id("[CLS]") and window.ids[-1] == tokenizer.token_to_id("[SEP]")
        labelled = [t for t, y in enumerate(window.labels) if y != IGNORE_INDEX]
        assert [window.labels[t] for t in labelled] == tags  # one label per word, in order
        for t, word in zip(labelled, sentence.words):  # each at the word's first subword
            assert window.ids[t] == tokenizer.encode(word, add_special_tokens=False).ids[0]
    assert any(len(w.ids) > len(s.words) + 2 for w, s in zip(windows, sentences))  # there were subwords
    # The model "predicts" the labels; merging them back gives every word its tag, garbage elsewhere ignored.
    predictions = [[y if y != IGNORE_INDEX else 99 for y in w.labels] for w in windows]
    assert merge_windows(windows, predictions, [len(s.words) for s in sentences]) == ids


def test_last_subword_labelling_for_causal_models_round_trips(tokenizer):
    rng = np.random.default_rng(3)
    sentences = _sentences(rng, 10, 5, 40)
    ids = tag_ids(sentences, tag_set(sentences))
    windows = encode_tagged(tokenizer, sentences, ids, max_length=16, stride=5, label_subword="last")
    full = tokenizer.encode_batch([s.words for s in sentences], is_pretokenized=True, add_special_tokens=False)
    for w in windows:
        for t, y in enumerate(w.labels):
            if y != IGNORE_INDEX:  # a labelled token ends its word: the full encoding's next token is another word
                word = w.word_ids[t]
                last = max(k for k, x in enumerate(full[w.sentence].word_ids) if x == word)
                assert full[w.sentence].ids[last] == w.ids[t] and y == ids[w.sentence][word]
    predictions = [[y if y != IGNORE_INDEX else 99 for y in w.labels] for w in windows]
    assert merge_windows(windows, predictions, [len(s.words) for s in sentences]) == ids
    with pytest.raises(LmforgeError, match="task.label_subword must be first or last"):
        encode_tagged(tokenizer, sentences, ids, 16, 5, label_subword="middle")


def test_label_all_subwords_labels_every_subword_with_its_word(tokenizer):
    sentence = TaggedSentence(["scientists", "determine"], ["B-PER", "O"], "s")
    window, = encode_tagged(tokenizer, [sentence], [[1, 0]], max_length=64, stride=0, label_all_subwords=True)
    assert window.labels == [IGNORE_INDEX] + [1 if w == 0 else 0 for w in window.word_ids[1:-1]] + [IGNORE_INDEX]
    assert sum(window.predicts_word) == 2


def test_long_sentence_windows_overlap_by_stride_and_merge_to_one_tag_per_word(tokenizer):
    rng = np.random.default_rng(1)
    sentences = _sentences(rng, 6, 25, 60)
    ids = tag_ids(sentences, tag_set(sentences))
    max_length, stride = 16, 5
    windows = encode_tagged(tokenizer, sentences, ids, max_length=max_length, stride=stride)
    full = tokenizer.encode_batch([s.words for s in sentences], is_pretokenized=True, add_special_tokens=False)
    for i, enc in enumerate(full):
        mine = [w for w in windows if w.sentence == i]
        assert len(mine) > 1
        assert all(len(w.ids) <= max_length for w in mine)
        bodies = [w.ids[1:-1] for w in mine]
        for a, b in zip(bodies, bodies[1:]):
            assert a[-stride:] == b[:stride]  # consecutive windows share exactly `stride` tokens
        assert sum(len(b) for b in bodies) - stride * (len(bodies) - 1) == len(enc.ids)
        assert bodies[0] + [t for b in bodies[1:] for t in b[stride:]] == list(enc.ids)
    # Each window predicts its own index at every token; a word must come from the window where its
    # labelled (first) subword is farthest from that window's edges (ties: the earlier window).
    predictions = [[k] * len(w.ids) for k, w in enumerate(windows)]
    merged = merge_windows(windows, predictions, [len(s.words) for s in sentences])
    for i, sentence in enumerate(sentences):
        for word in range(len(sentence.words)):
            best, best_context = None, -1
            for k, w in enumerate(windows):
                if w.sentence != i:
                    continue
                positions = [t for t in range(len(w.ids)) if w.word_ids[t] == word and w.predicts_word[t]]
                for t in positions:
                    context = min(t - 1, len(w.ids) - 2 - t)
                    if context > best_context:
                        best, best_context = k, context
            assert merged[i][word] == best
    # With labels as predictions, the windows merge back to the sentence's tags.
    labels_as_predictions = [[y if y != IGNORE_INDEX else 99 for y in w.labels] for w in windows]
    assert merge_windows(windows, labels_as_predictions, [len(s.words) for s in sentences]) == ids


def test_stride_must_leave_room(tokenizer):
    sentence = TaggedSentence(["sheep"], ["O"], "s")
    with pytest.raises(LmforgeError, match=r"task.stride must be in \[0, 6\)"):
        encode_tagged(tokenizer, [sentence], None, max_length=8, stride=6)


def _random_tags(rng, scheme, n):
    prefixes = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}[scheme]
    options = ["O"] + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC", "ORG")]
    return [[options[i] for i in rng.integers(0, len(options), rng.integers(1, 15))] for _ in range(n)]


@pytest.mark.parametrize("scheme,seqeval_scheme", [("IOB1", IOB1), ("IOB2", IOB2), ("BIOES", IOBES)])
def test_entity_scores_equal_seqeval_on_random_sequences(scheme, seqeval_scheme):
    rng = np.random.default_rng(7)
    for _ in range(20):
        true = _random_tags(rng, scheme, 30)
        pred = [[t if rng.random() < 0.6 else rng.choice(["O", "B-PER", "I-LOC", "I-ORG"]) for t in s] for s in true]
        ours = entity_scores(true, pred, scheme, mode="conlleval")
        assert ours["entity_f1"] == pytest.approx(100 * f1_score(true, pred), abs=1e-9)
        assert ours["entity_precision"] == pytest.approx(100 * precision_score(true, pred), abs=1e-9)
        assert ours["entity_recall"] == pytest.approx(100 * recall_score(true, pred), abs=1e-9)
        strict = entity_scores(true, pred, scheme, mode="strict")
        kw = dict(mode="strict", scheme=seqeval_scheme)
        assert strict["entity_f1"] == pytest.approx(100 * f1_score(true, pred, **kw), abs=1e-9)
        report = classification_report(true, pred, output_dict=True, zero_division=0, **kw)
        for kind in ("PER", "LOC", "ORG"):
            assert strict[f"f1_{kind}"] == pytest.approx(100 * report[kind]["f1-score"], abs=1e-9)


def test_entity_scores_by_hand():
    # IOB1: a B- only separates two adjacent entities of one type; I-PER I-PER B-PER is two entities.
    true = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    assert entity_scores(true, true, "IOB1")["entity_f1"] == 100.0
    assert entities(list("abcde"), true[0]) == [("PER", "a b", 0, 1), ("PER", "c", 2, 2), ("LOC", "e", 4, 4)]
    # Predicting one merged PER and the LOC: 1 of 2 predicted correct, 1 of 3 gold found.
    scores = entity_scores(true, [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]], "IOB1")
    assert scores["entity_precision"] == pytest.approx(50.0)
    assert scores["entity_recall"] == pytest.approx(100 / 3)
    assert scores["f1_PER"] == 0.0 and scores["f1_LOC"] == 100.0
    # BIOES strict: B-PER without its E-PER is no entity; conlleval chunking still counts it.
    true = [["B-PER", "E-PER", "S-LOC"]]
    pred = [["B-PER", "I-PER", "S-LOC"]]
    assert entity_scores(true, pred, "BIOES", "strict")["entity_recall"] == pytest.approx(50.0)
    assert entity_scores(true, pred, "BIOES", "conlleval")["entity_f1"] == 100.0


def test_no_entities_anywhere_scores_zero_quietly(recwarn):
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"entity_precision": 0.0, "entity_recall": 0.0,
                                                         "entity_f1": 0.0}
    assert entity_scores([["O", "B-PER"]], [["O", "O"]], "IOB2", "strict")["f1_PER"] == 0.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_tagging_metrics_from_class_indices():
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    true = [[1, 2, 0, 3], [0, 0]]
    pred = [[1, 2, 0, 0], [0, 3]]
    scores = tagging_metrics(labels, true, pred, "IOB2")
    assert scores["token_accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["entity_precision"] == pytest.approx(50.0) and scores["entity_recall"] == pytest.approx(50.0)
    assert scores["f1_PER"] == 100.0 and scores["f1_LOC"] == 0.0


DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
            Path("/nonexistent"))


def test_shipped_recipe_reads_conll2003_as_provenance_counts():
    if not (DATA / "conll2003" / "train.txt").is_file():
        pytest.skip("CoNLL-2003 is not in ../shared/data")
    config = resolve_task_config("ner-conll2003", overrides=[f"path={DATA / 'conll2003'}"])
    assert (config.kind, config.scheme, config.stride, config.select_metric) == ("tokens", "IOB2", 32, "entity_f1")
    assert recipe_finetune("ner-conll2003")["max_length"] == 128
    task = load_tagging_task(config)
    assert (len(task.train), len(task.dev)) == (14_041, 3_250)  # PROVENANCE.md: sentences without -DOCSTART-
    assert sum(len(s.words) for s in task.train) == 203_621
    assert task.label_names == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    entity_counts = {}
    for s in task.train:
        for kind, *_ in entities(s.words, s.tags):
            entity_counts[kind] = entity_counts.get(kind, 0) + 1
    assert entity_counts == {"PER": 6_600, "LOC": 7_140, "ORG": 6_321, "MISC": 3_438}


def test_tokens_config_is_validated(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL)
    (tmp_path / "dev.txt").write_text(CONLL.replace("B-LOC", "B-PLACE"))
    base = dict(name="t", path=str(tmp_path), kind="tokens")
    with pytest.raises(LmforgeError, match="task.labels: tag 'X' does not fit task.scheme IOB2"):
        load_tagging_task(TaskConfig(**base, labels=["O", "B-PER", "X"]).validate())
    with pytest.raises(LmforgeError, match="task.labels lists a tag twice"):
        TaskConfig(**base, labels=["O", "B-PER", "O"]).validate()
    with pytest.raises(LmforgeError, match="format 'squad' does not apply to a tokens task"):
        TaskConfig(**base, format="squad").validate()
    with pytest.raises(LmforgeError, match="metric 'bleu' does not apply to tokens"):
        TaskConfig(**base, metrics=["bleu"]).validate()
    config = TaskConfig(**base).validate()
    assert config.metrics == ["entity_f1", "entity_precision", "entity_recall", "token_accuracy"]
    with pytest.raises(LmforgeError, match=r"dev.txt:14: tag 'B-PLACE' is not in the label set"):
        load_tagging_task(config)
    (tmp_path / "dev.txt").write_text(CONLL.replace("B-LOC", "S-LOC"))
    with pytest.raises(LmforgeError, match=r"dev.txt: tag 'S-LOC' does not fit task.scheme IOB2"):
        load_tagging_task(TaskConfig(**base, train_file="dev.txt").validate())


def test_split_words_of_a_raw_text_for_prediction(tokenizer):
    text = "Peter Blackburn met the EU's envoy in Brussels."
    words = split_words(tokenizer, text)
    assert [w for w, _ in words] == ["Peter", "Blackburn", "met", "the", "EU", "'", "s", "envoy", "in", "Brussels", "."]
    assert all(text[a:b] == w for w, (a, b) in words)
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    assert [w for w, _ in split_words(bare, " a  b\tc ")] == ["a", "b", "c"]
