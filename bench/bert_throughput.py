"""Training-step throughput: lmforge's BERT vs transformers' BertForPreTraining of identical dimensions.

Both get the same batches of real BERT examples (masked sentence pairs from the MLM+NSP objective,
with padding), the same optimizer and precision, in one process; measured in alternating rounds.
The loss is the same (MLM cross-entropy on masked positions + NSP); ours projects only the masked
positions onto the vocabulary, transformers projects every position and ignores the rest.

    python bench/bert_throughput.py                 # bert-tiny (4L/256/4H, seq 128, vocab 8192), fp32
    python bench/bert_throughput.py --shapes mini tiny --steps 5

Last line: `ratio X.XX` = our tokens/s / peer's tokens/s on the first shape listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_rounds, make_step  # noqa: E402

from lmforge.data.objectives.mlm import BertVocab, MaskingSpec, build_pair, mask_tokens  # noqa: E402
from lmforge.interop.hf import bert_hf_config, bert_state_to_hf  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402
from lmforge.train.device import measured_matmul_flops  # noqa: E402

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, d_model=256, block_size=128, batch=16),  # configs/bert-tiny.yaml
    "mini": dict(n_layer=2, n_head=2, d_model=128, block_size=128, batch=32),
}
VOCAB = 8192


def make_batches(count: int, batch: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Masked sentence pairs of random lengths (so some padding), random NSP labels."""
    rng = np.random.default_rng(seed)
    vocab = BertVocab(cls=2, sep=3, pad=0, mask=4, vocab_size=VOCAB, special=np.arange(5), continues_word=None)
    pool = vocab.random_pool
    out = []
    for _ in range(count):
        rows = []
        for _ in range(batch):
            a = rng.integers(5, VOCAB, int(rng.integers(10, seq_len // 2)))
            b = rng.integers(5, VOCAB, int(rng.integers(10, seq_len // 2)))
            ids, types, attention = build_pair(a, b, seq_len, vocab, rng)
            masked, labels = mask_tokens(ids, types, vocab, MaskingSpec(), rng, pool)
            rows.append((masked, types, attention, labels, int(rng.integers(2))))
        cols = [torch.from_numpy(np.stack([r[i] for r in rows])) for i in range(4)]
        out.append({"input_ids": cols[0], "token_type_ids": cols[1], "attention_mask": cols[2],
                    "mlm_labels": cols[3], "nsp_labels": torch.tensor([r[4] for r in rows])})
    return out


def build_models(shape: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = ModelConfig(family="bert", vocab_size=VOCAB, n_layer=shape["n_layer"], n_head=shape["n_head"],
                         d_model=shape["d_model"], block_size=shape["block_size"], layer_norm_eps=1e-12)
    ours = build_model(config)
    peer_config = BertConfig(**bert_hf_config(config))
    peer_config._attn_implementation = "sdpa"  # torch SDPA, as ours
    peer = BertForPreTraining(peer_config)
    peer.load_state_dict(bert_state_to_hf(ours.state_dict(), config), strict=False)  # same starting point
    return ours, peer


def step_fn(model: torch.nn.Module, is_ours: bool, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    if is_ours:
        return make_step(model, optimizer, lambda m, batch: m(**batch).loss, precision)
    return make_step(model, optimizer, lambda m, batch: m(
        input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
        labels=batch["mlm_labels"], next_sentence_label=batch["nsp_labels"]).loss, precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "mini"], choices=list(SHAPES))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model per round")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.precision}")
    print(f"{'shape':<7}{'peak GFLOP/s':>13}{'ours tok/s':>12}{'ours MFU':>10}{'peer tok/s':>12}{'ours/peer':>11}")
    ratios = []
    for name in args.shapes:
        shape = SHAPES[name]
        ours, peer = build_models(shape)
        batches = make_batches(args.steps, shape["batch"], shape["block_size"])
        # the same loss on the same weights: the comparison is like for like
        with torch.no_grad():
            ref_ours = ours.eval()(**batches[0]).loss.item()
            ref_peer = peer.eval()(input_ids=batches[0]["input_ids"], token_type_ids=batches[0]["token_type_ids"],
                                   attention_mask=batches[0]["attention_mask"], labels=batches[0]["mlm_labels"],
                                   next_sentence_label=batches[0]["nsp_labels"]).loss.item()
        assert abs(ref_ours - ref_peer) < 1e-3, (ref_ours, ref_peer)
        ours.train()
        peer.train()
        steppers = {"ours": step_fn(ours, True, args.precision), "peer": step_fn(peer, False, args.precision)}
        seconds = alternate_rounds({k: (lambda i, f=f: f(batches[i])) for k, f in steppers.items()},
                                   args.rounds, args.steps, args.max_seconds)
        tokens = shape["batch"] * shape["block_size"]
        peak = measured_matmul_flops(torch.device("cpu"), args.precision)
        ours_tps, peer_tps = tokens / seconds["ours"], tokens / seconds["peer"]
        mfu = ours_tps * ours.flops_per_token(shape["block_size"]) / peak
        ratios.append(ours_tps / peer_tps)
        print(f"{name:<7}{peak / 1e9:>13.1f}{ours_tps:>12,.0f}{mfu:>10.1%}{peer_tps:>12,.0f}{ratios[-1]:>11.2f}",
              flush=True)
    print(f"ratio {ratios[0]:.2f}")


if __name__ == "__main__":
    main()
