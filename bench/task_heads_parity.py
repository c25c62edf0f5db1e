"""Logit parity of BERT task models with transformers, both ways, printing the max abs differences.

    PYTHONPATH=.:tests python bench/task_heads_parity.py

Export: a tiny BERT fine-tuned here (60 steps, the NER and QA tasks of tests/test_finetune_kinds.py) ->
`lmforge export` -> BertForTokenClassification / BertForQuestionAnswering on a padded batch, then
`lmforge import` of that directory against the same. Import: random transformers task models (weights
moved well away from the init) -> `lmforge import` -> our logits against theirs. The assertions live in
tests/test_interop_task_heads.py; this prints the numbers docs/interop.md quotes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import test_interop_task_heads as heads  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.data.tokenizer import load_tokenizer  # noqa: E402
from lmforge.interop.hf_tokenizer import write_tokenizer_files  # noqa: E402
from lmforge.tasks.finetune import load_finetuned  # noqa: E402
from test_finetune import make_base_run  # noqa: E402

NATIVE = [("BertForTokenClassification", {"id2label": {0: "O", 1: "B-PER", 2: "I-PER", 3: "S-LOC", 4: "E-LOC"}}),
          ("BertForQuestionAnswering", {}),
          ("BertForSequenceClassification", {"id2label": {0: "neg", 1: "pos", 2: "mixed"}})]


def exported_and_back(root: Path, kind: str) -> None:
    run, task = heads._finetuned(root, kind, 60)
    hf = root / "hf"
    main(["export", str(run), "--to", "hf", str(hf)])
    batch = heads._batch(hf, kind)
    theirs, _ = heads._theirs(hf, batch, kind)
    main(["import", str(hf), str(root / "back"), "--task", str(task), *heads.sets(heads.WINDOWS[kind])])
    print(f"{kind}: export {(heads._ours(run, batch, kind) - theirs).abs().max().item():.1e}, import "
          f"{(heads._ours(root / 'back', batch, kind) - theirs).abs().max().item():.1e} (logits up to "
          f"{theirs.abs().max().item():.2f}; {(batch['attention_mask'] == 0).sum().item()} padded positions)")


def imported(root: Path, cls_name: str, kw: dict) -> None:
    tokenizer = load_tokenizer(make_base_run(root) / "tokenizer.json")
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=48, **kw)
    torch.manual_seed(0)
    theirs = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    theirs.save_pretrained(root / "hf")
    write_tokenizer_files(tokenizer, "bert", root / "hf", model_max_length=48)
    main(["import", str(root / "hf"), str(root / "run")])
    model = load_finetuned(root / "run").model
    batch = transformers.AutoTokenizer.from_pretrained(root / "hf")(
        ["bob went to oslo today", "the film"], ["in rome", "was good and carol went"], padding=True,
        return_tensors="pt")
    with torch.no_grad():
        ours, out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]), theirs(**batch)
    if isinstance(ours, tuple):  # span: start, end
        ours, reference = torch.stack(ours, -1), torch.stack([out.start_logits, out.end_logits], -1)
    else:
        reference = out.logits
    print(f"{cls_name} imported: {(ours - reference).abs().max().item():.1e} (logits up to "
          f"{reference.abs().max().item():.2f})")


if __name__ == "__main__":
    for kind in ("tokens", "span"):
        with tempfile.TemporaryDirectory() as tmp:
            exported_and_back(Path(tmp), kind)
    for cls_name, kw in NATIVE:
        with tempfile.TemporaryDirectory() as tmp:
            imported(Path(tmp), cls_name, kw)
