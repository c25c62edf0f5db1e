"""Data side of the tokens / span / seq2seq recipes on the real files: sizes, windows, a QA oracle and text baselines.

Run from the repository root with ../shared beside it:  python bench/task_data_check.py
(docs/tasks.md quotes its output). The QA oracle puts the gold token positions through the windows,
best_answers and the SQuAD scoring: what is lost to tokenisation and windowing alone.
"""

import time
import numpy as np
from tokenizers import Tokenizer
from lmforge.tasks import qa, seq2seq, tagging
from lmforge.tasks.batches import task_tokenizer
from lmforge.tasks.config import resolve_task_config

tok = task_tokenizer(Tokenizer.from_file("../shared/data/models/all-MiniLM-L6-v2/tokenizer.json"), "bert", 512)
t = time.time(); ner = tagging.load_tagging_task(resolve_task_config("ner-conll2003"))
windows = tagging.encode_tagged(tok, ner.train, ner.train_tags, 128, ner.config.stride)
print(f"ner: {len(ner.train)} / {len(ner.dev)} sentences, {len(windows)} train windows, "
      f"{np.mean([len(w.ids) for w in windows]):.1f} tokens mean, {time.time() - t:.1f}s")
t = time.time(); span = qa.load_span_task(resolve_task_config("qa-squad"))
train_w = qa.encode_qa(tok, span.train, 384, span.config.stride)
dev_w = qa.encode_qa(tok, span.dev, 384, span.config.stride)
print(f"qa: {len(span.train)} / {len(span.dev)} questions, {len(train_w)} / {len(dev_w)} windows, "
      f"{sum(w.start == 0 for w in train_w)} train windows without the answer, {time.time() - t:.1f}s")
oracle = [(np.eye(len(w.ids))[w.start] * (w.start > 0), np.eye(len(w.ids))[w.end] * (w.start > 0)) for w in dev_w]
answers = qa.best_answers(dev_w, span.dev, [s for s, _ in oracle], [e for _, e in oracle], 30)
print("qa oracle (gold token positions through windows and offsets):", qa.squad_scores(answers, span.dev))
for name in ("mt-multi30k", "sum-dialogsum"):
    t = time.time(); task = seq2seq.load_seq2seq_task(resolve_task_config(name))
    print(f"{name}: {len(task.train)} / {len(task.dev)} pairs, {task.skipped} skipped, {time.time() - t:.1f}s")
mt = seq2seq.load_seq2seq_task(resolve_task_config("mt-multi30k"))
copied = seq2seq.bleu([e.source for e in mt.dev], [e.target for e in mt.dev])
print("mt copy-the-source baseline, dev BLEU:", round(copied, 2))
summ = seq2seq.load_seq2seq_task(resolve_task_config("sum-dialogsum"))
lead = [" ".join(e.source.split("\n")[:2]) for e in summ.dev]
scores = seq2seq.rouge(lead, [e.target for e in summ.dev])
print("sum lead-2-turns baseline, dev ROUGE:", {k: round(v, 2) for k, v in scores.items()})
