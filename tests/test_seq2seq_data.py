"""Seq2seq data: Multi30k / DialogSum / TSV readers, empty targets, input truncation; BLEU and ROUGE vs the packages."""

import gzip
import itertools
import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.tasks.batches import IGNORE_INDEX
from lmforge.tasks.config import TaskConfig, resolve_task_config
from lmforge.tasks.seq2seq import (as_generation, bleu, collate_seq2seq, encode_seq2seq, load_seq2seq_task,
                                   read_parallel, read_seq2seq_jsonl, rouge, seq2seq_metrics)

# ../shared/data beside the checkout (or beside the worktrees' folder)
DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
            Path("/nonexistent"))
MULTI30K, DIALOGSUM = DATA / "multi30k", DATA / "dialogsum"


def _lines(path, n):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def multi30k_val():
    if not (MULTI30K / "val.de.gz").is_file():
        pytest.skip("Multi30k is not in ../shared/data")
    return _lines(MULTI30K / "val.en.gz", 40), _lines(MULTI30K / "val.de.gz", 40)


def _hypotheses(references):
    """Imperfect outputs made from the references: words dropped, swapped and replaced, differently per line."""
    out = []
    for i, ref in enumerate(references):
        words = ref.split()
        if i % 3 == 0 and len(words) > 3:
            words = words[:-2]
        elif i % 3 == 1 and len(words) > 2:
            words[0], words[1] = words[1], words[0]
        else:
            words = ["eine" if w.lower() in ("ein", "einem") else w for w in words] + ["."]
        out.append(" ".join(words))
    return out


def test_bleu_equals_sacrebleu_on_multi30k_sentences(multi30k_val):
    _, german = multi30k_val
    hyps = _hypotheses(german)
    assert bleu(hyps, german) == pytest.approx(sacrebleu.corpus_bleu(hyps, [german]).score, abs=1e-12)
    assert bleu(hyps, german, lowercase=True) == pytest.approx(
        sacrebleu.BLEU(lowercase=True).corpus_score(hyps, [german]).score, abs=1e-12)
    assert 20 < bleu(hyps, german) < 100
    assert bleu(german, german) == pytest.approx(100.0)


def test_rouge_equals_rouge_score_on_dialogsum_summaries():
    if not (DIALOGSUM / "dialogsum.dev.jsonl").is_file():
        pytest.skip("DialogSum is not in ../shared/data")
    summaries = [json.loads(line)["summary"] for line in
                 (DIALOGSUM / "dialogsum.dev.jsonl").read_text(encoding="utf-8").splitlines()[:30]]
    hyps = _hypotheses(summaries)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    reference = {k: 100 * sum(scorer.score(r, h)[k].fmeasure for h, r in zip(hyps, summaries)) / len(hyps)
                 for k in ("rouge1", "rouge2", "rougeL")}
    assert rouge(hyps, summaries) == pytest.approx(reference, abs=1e-9)
    assert seq2seq_metrics(["rougeL", "bleu"], hyps, summaries)["rougeL"] == pytest.approx(reference["rougeL"])


def test_rouge_by_hand():
    # "the cat sat" against "the cat sat down": unigram P 3/3, R 3/4 -> F 6/7; bigrams P 2/2, R 2/3 -> F 0.8
    scores = rouge(["the cat sat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(100 * 6 / 7)
    assert scores["rouge2"] == pytest.approx(80.0)
    assert scores["rougeL"] == pytest.approx(100 * 6 / 7)


def test_multi30k_reader_pairs_lines_and_languages_are_configurable(multi30k_val):
    english, german = multi30k_val
    config = TaskConfig(name="mt", path=str(MULTI30K), kind="seq2seq", format="parallel", train_file="val",
                        dev_file="val", source_language="en", target_language="de").validate()
    task = load_seq2seq_task(config)
    assert len(task.train) == 1014 and task.skipped == 0
    assert [(e.source, e.target) for e in task.train[:40]] == list(zip(english, german))
    assert task.train[0].where == f"{MULTI30K / 'val.de.gz'}:1"
    reverse = TaskConfig(name="mt", path=str(MULTI30K), kind="seq2seq", format="parallel", train_file="val",
                         dev_file="val", source_language="de", target_language="en").validate()
    assert load_seq2seq_task(reverse).dev[1].source == german[1]
    with pytest.raises(LmforgeError, match="needs task.source_language"):
        TaskConfig(name="mt", path=str(MULTI30K), kind="seq2seq", format="parallel").validate()


def test_parallel_files_of_unequal_length_are_refused(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    with pytest.raises(LmforgeError, match=r"a.en has 2 lines but .*a.de has 1"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")


def test_dialogsum_train_lines_are_python_literals_read_without_eval(tmp_path):
    if not (DIALOGSUM / "dialogsum.train.jsonl").is_file():
        pytest.skip("DialogSum is not in ../shared/data")
    head = (DIALOGSUM / "dialogsum.train.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    with pytest.raises(json.JSONDecodeError):
        json.loads(head[0])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(head))
    data = read_seq2seq_jsonl(path, "dialogue", "summary")
    assert len(data.examples) == 5
    assert data.examples[0].source.startswith("#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins.")
    assert "\n#Person2#:" in data.examples[0].source  # turns stay on their own lines
    # Code in a line is not run: literal_eval refuses it.
    marker = tmp_path / "ran"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(LmforgeError, match=r"train.jsonl:1: neither JSON .* nor a Python literal"):
        read_seq2seq_jsonl(path)
    assert not marker.exists()


def test_empty_target_is_counted_and_skipped_or_refused_when_strict(tmp_path, caplog):
    (tmp_path / "train.tsv").write_text("input\ttarget\nHello\tHallo\nCat\t \nDog\tHund\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"input": "Dog", "target": "Hund"}) + "\n"
                                        + json.dumps({"input": "", "target": "x"}) + "\n")
    config = TaskConfig(name="t", path=str(tmp_path), kind="seq2seq", text="input", label="target").validate()
    task = load_seq2seq_task(config)
    assert [(e.source, e.target) for e in task.train] == [("Hello", "Hallo"), ("Dog", "Hund")]
    assert task.skipped == 2 and len(task.dev) == 1
    assert "skipped 1 pair(s)" in caplog.text
    config.strict = True
    with pytest.raises(LmforgeError, match=r"train.tsv:3: the target is empty"):
        load_seq2seq_task(config)


def test_long_inputs_are_cut_and_counted_or_refused_when_strict():
    from lmforge.tasks.seq2seq import Seq2SeqExample

    tok = train_tokenizer(["a man sleeps on a green couch in a room"] * 10, TokenizerConfig(kind="wordpiece",
                          vocab_size=60), family="bert", show_progress=False)
    examples = [Seq2SeqExample("a man sleeps", "a man", "f:1"),
                Seq2SeqExample("a man sleeps on a green couch in a room", "a room", "f:2")]
    features, cut = encode_seq2seq(tok, examples, max_source_length=6, max_target_length=4)
    assert cut == 1
    assert len(features[1].source_ids) == 6 and features[1].source_ids[-1] == tok.token_to_id("[SEP]")
    assert features[0].source_ids == tok.encode("a man sleeps").ids
    with pytest.raises(LmforgeError, match=r"f:2: the input is longer than finetune.max_length 6"):
        encode_seq2seq(tok, examples, 6, 4, strict=True)
    # a target past task.max_target_length likewise: cut and counted, or named when strict
    assert encode_seq2seq(tok, examples, 20, 3)[1] == 2  # "a man" and "a room" are 4 tokens with [CLS]/[SEP]
    with pytest.raises(LmforgeError, match=r"f:1: the target is longer than task.max_target_length 3"):
        encode_seq2seq(tok, examples, 20, 3, strict=True)
    batch = collate_seq2seq(features, pad=tok.token_to_id("[PAD]"))
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][0].tolist() == [1] * 5 + [0]
    assert batch["labels"][1].tolist() == features[1].target_ids + [IGNORE_INDEX] * (4 - len(features[1].target_ids))
    prompts = as_generation(examples, "Translate: {input}\n=")
    assert prompts[0].text == "Translate: a man sleeps\n=" and prompts[0].label == "a man"


def test_shipped_recipes_read_multi30k_and_dialogsum():
    if not (DIALOGSUM / "dialogsum.train.jsonl").is_file() or not (MULTI30K / "train.en.gz").is_file():
        pytest.skip("Multi30k / DialogSum are not in ../shared/data")
    mt = load_seq2seq_task(resolve_task_config("mt-multi30k", overrides=[f"path={MULTI30K}"]))
    assert (len(mt.train), len(mt.dev), mt.skipped) == (29_000, 1_014, 0)
    assert mt.train[0].target == _lines(MULTI30K / "train.de.gz", 1)[0]
    summaries = resolve_task_config("sum-dialogsum", overrides=[f"path={DIALOGSUM}"])
    assert summaries.select_metric == "rougeL" and "{input}" in summaries.prompt
    task = load_seq2seq_task(summaries)
    assert (len(task.train), len(task.dev), task.skipped) == (12_460, 500, 0)
    assert task.train[0].target.startswith("Mr. Smith's getting a check-up")


def test_missing_scoring_package_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # what an environment without the package imports
    with pytest.raises(LmforgeError, match=r"scored with the sacrebleu package, which is not installed: pip install "
                                           r"'lmforge\[tasks\]'"):
        bleu(["a"], ["a"])


def test_decoder_inputs_that_encode_generation_cuts_are_counted_or_refused(multi30k_val):
    from lmforge.tasks.batches import encode_generation
    from lmforge.tasks.seq2seq import Seq2SeqExample, count_cut_prompts

    english, german = multi30k_val
    tok = train_tokenizer(english + german, TokenizerConfig(kind="bpe", vocab_size=400), family="gpt",
                          show_progress=False)
    examples = as_generation([Seq2SeqExample(e, g, f"val:{i}") for i, (e, g) in enumerate(zip(english, german), 1)],
                             "English: {input}\nGerman: ")
    max_length = 90
    expected = 0
    for e in examples:  # the reference: does encode_generation's input hold the whole prompt and target?
        full = sum(len(tok.encode(text, add_special_tokens=False).ids) for text in (e.text, e.label))
        expected += len(encode_generation(tok, [e], max_length)[0].ids) < full  # input = prompt + target (+ eos - 1)
    assert 0 < expected < len(examples)
    assert count_cut_prompts(tok, examples, max_length) == expected
    with pytest.raises(LmforgeError, match=r"val:\d+: the input and target are \d+ tokens, more than "
                                           r"finetune.max_length 90"):
        count_cut_prompts(tok, examples, max_length, strict=True)


@pytest.mark.parametrize("keys,message", [
    (dict(prompt="Translate:"), r"task.prompt must contain \{input\}"),
    (dict(format="conll"), "format 'conll' does not apply to a seq2seq task"),
    (dict(held_out_articles=3), "held_out_articles splits a span task's file"),
    (dict(source_language="en", target_language="de"), "name the sides of format parallel"),
    (dict(labels=["a", "b"]), "labels does not apply to a seq2seq task"),
    (dict(metrics=["entity_f1"]), "metric 'entity_f1' does not apply to seq2seq"),
    (dict(max_target_length=0), "max_target_length must be positive"),
])
def test_seq2seq_config_mistakes_name_the_key(tmp_path, keys, message):
    with pytest.raises(LmforgeError, match=message):
        TaskConfig(name="t", path=str(tmp_path), kind="seq2seq", **keys).validate()
    defaults = TaskConfig(name="t", path=str(tmp_path), kind="seq2seq").validate()
    assert defaults.metrics == ["bleu", "rouge1", "rouge2", "rougeL"] and defaults.select_metric == "bleu"
