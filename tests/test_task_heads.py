"""Per-token task models: shapes, padding invariance, hidden states, losses, and a tiny end-to-end fit of each."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import build_model
from lmforge.model.config import ModelConfig
from lmforge.tasks import qa, tagging
from lmforge.tasks.batches import IGNORE_INDEX, task_tokenizer
from lmforge.tasks.heads import (SpanExtractor, TokenClassifier, backbone_hidden, build_per_token_model, span_loss,
                                 token_classification_loss)

TEXT = "peter lives in paris . anna works in london . the city is big . bob is in rome ."


def _config(family, vocab=100):
    config = ModelConfig(family=family, n_layer=2, n_head=2, d_model=32, block_size=64, vocab_size=vocab)
    config.validate("model")
    return config


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_shapes_and_padding_does_not_change_real_tokens(family):
    torch.manual_seed(0)
    tagger = build_per_token_model(_config(family), "tokens", 5, dropout=0.0).eval()
    spans = build_per_token_model(_config(family), "span", 0, dropout=0.0).eval()
    a = torch.randint(5, 100, (1, 9))
    b = torch.randint(5, 100, (1, 4))
    ids = torch.zeros(2, 9, dtype=torch.int64)
    ids[0], ids[1, :4] = a[0], b[0]
    mask = torch.zeros(2, 9, dtype=torch.int64)
    mask[0], mask[1, :4] = 1, 1
    types = torch.zeros_like(ids)
    with torch.no_grad():
        logits = tagger(ids, types, mask)
        start, end = spans(ids, types, mask)
        assert logits.shape == (2, 9, 5) and start.shape == (2, 9) and end.shape == (2, 9)
        alone = tagger(b, torch.zeros_like(b), torch.ones_like(b))
        torch.testing.assert_close(logits[1, :4], alone[0], atol=1e-5, rtol=1e-5)
        whole = tagger(a, torch.zeros_like(a), torch.ones_like(a))
        torch.testing.assert_close(logits[0], whole[0], atol=1e-5, rtol=1e-5)
        s_alone, e_alone = spans(b, torch.zeros_like(b), torch.ones_like(b))
        torch.testing.assert_close(start[1, :4], s_alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(end[1, :4], e_alone[0], atol=1e-5, rtol=1e-5)


def test_backbone_hidden_is_the_final_hidden_state_the_lm_heads_read():
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 7))
    gpt = build_model(_config("gpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(gpt.lm_head(backbone_hidden(gpt, ids)), gpt(ids).logits)
        bert = build_model(_config("bert")).eval()
        mask = torch.ones_like(ids)
        torch.testing.assert_close(bert.mlm(backbone_hidden(bert.bert, ids, torch.zeros_like(ids), mask)),
                                   bert(ids, torch.zeros_like(ids), mask).mlm_logits)


def test_losses_are_berts():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0], [0, IGNORE_INDEX, 1, 1, IGNORE_INDEX]])
    keep = labels != IGNORE_INDEX
    expected = -torch.log_softmax(logits, -1)[keep].gather(1, labels[keep][:, None]).mean()
    torch.testing.assert_close(token_classification_loss(logits, labels).double(), expected, rtol=1e-6, atol=1e-6)
    s, e = torch.randn(3, 6), torch.randn(3, 6)
    sp, ep = torch.tensor([0, 2, 5]), torch.tensor([0, 3, 5])
    torch.testing.assert_close(span_loss(s, e, sp, ep), (F.cross_entropy(s, sp) + F.cross_entropy(e, ep)) / 2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT] * 20, TokenizerConfig(kind="wordpiece", vocab_size=80), family="bert",
                           show_progress=False)


def _fit(model, batch, loss_fn, steps=60):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model.eval()


def test_tagger_fits_windows_and_merges_back_to_every_word(tokenizer):
    words = TEXT.split()
    places = {"paris", "london", "rome"}
    people = {"peter", "anna", "bob"}
    tags = ["B-LOC" if w in places else "B-PER" if w in people else "O" for w in words]
    sentence = tagging.TaggedSentence(words, tags, "s")
    labels = ["O", "B-LOC", "B-PER"]
    ids = tagging.tag_ids([sentence], labels)
    tok = task_tokenizer(tokenizer, "bert", 64)
    windows = tagging.encode_tagged(tok, [sentence], ids, max_length=12, stride=4)
    assert len(windows) > 2
    batch = tagging.collate_windows(windows, pad=tokenizer.token_to_id("[PAD]"))
    config = _config("bert", tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = TokenClassifier(build_model(config).bert, len(labels), dropout=0.0)
    inputs = ("input_ids", "token_type_ids", "attention_mask")
    _fit(model, batch, lambda m, b: token_classification_loss(m(*(b[k] for k in inputs)), b["labels"]))
    with torch.no_grad():
        predicted = model(*(batch[k] for k in inputs)).argmax(-1).numpy()
    merged = tagging.merge_windows(windows, [p[: len(w.ids)] for p, w in zip(predicted, windows)], [len(words)])
    assert merged == ids
    scores = tagging.tagging_metrics(labels, ids, merged)
    assert scores["entity_f1"] == 100.0 and scores["token_accuracy"] == 100.0
    assert [e[:2] for e in tagging.entities(words, [labels[i] for i in merged[0]])][:2] == [("PER", "peter"),
                                                                                          ("LOC", "paris")]


def test_span_extractor_fits_windows_and_recovers_answers(tokenizer):
    # One city per passage, at different depths, so the windows that hold it and those that do not both occur.
    passages = ["peter lives in paris . the city is big . anna works .",
                "anna works . the city is big . bob is in london .",
                "the city is big . rome . peter lives in it . anna works ."]
    examples = [qa.QAExample(str(k), "t", "where is it ?", p, (city,), p.index(city), "s")
                for k, (p, city) in enumerate(zip(passages, ["paris", "london", "rome"]))]
    tok = task_tokenizer(tokenizer, "bert", 64)
    windows = qa.encode_qa(tok, examples, max_length=20, stride=6)
    assert len(windows) > len(examples)
    batch = qa.collate_windows(windows, pad=tokenizer.token_to_id("[PAD]"))
    assert batch["start_positions"].tolist() == [w.start for w in windows]
    torch.manual_seed(0)
    model = SpanExtractor(build_model(_config("bert", tokenizer.get_vocab_size())).bert, dropout=0.0)
    inputs = ("input_ids", "token_type_ids", "attention_mask")
    _fit(model, batch, lambda m, b: span_loss(*m(*(b[k] for k in inputs)), b["start_positions"], b["end_positions"]),
         steps=100)
    with torch.no_grad():
        start, end = model(*(batch[k] for k in inputs))
    answers = qa.best_answers(windows, examples, list(start.numpy()), list(end.numpy()), max_answer_length=5)
    assert answers == ["paris", "london", "rome"]
    assert qa.squad_scores(answers, examples) == {"exact_match": 100.0, "span_f1": 100.0}
