"""Beam-search decoding of a GPT: lmforge's beam_search vs transformers' generate(num_beams=...) on the same
weights (our model exported to GPT2LMHeadModel in memory), and lmforge with vs without its KV cache.

Random weights and no end token, so every hypothesis runs the full length and both sides do the same number of
steps; the outputs are checked to be identical before timing.

    python bench/beam_decode.py                       # 4L/128/4H, vocab 8192, prompt 32, 64 new tokens, 4 beams
    python bench/beam_decode.py --beams 8 --new 32 --rounds 3

Last line: `ratio X.XX` = transformers' seconds per decode / lmforge's (cached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_rounds  # noqa: E402

from lmforge.infer.generate import beam_search  # noqa: E402
from lmforge.interop.hf import gpt_hf_config, state_to_hf  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    config = ModelConfig(family="gpt", n_layer=4, n_head=4, d_model=128, block_size=256, vocab_size=8192, dropout=0.0)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    # no end token on either side (transformers' is an id past the vocabulary): every decode runs the full length
    hf_config = transformers.GPT2Config(**{k: v for k, v in gpt_hf_config(config, 8192).items()
                                           if k not in ("model_type", "architectures")})
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    theirs.load_state_dict(state_to_hf(ours.state_dict(), config), strict=False)
    theirs.generation_config.pad_token_id = 8192
    prompt = torch.randint(1, 8192, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    def lmforge_cached(_: int):
        return beam_search(ours, prompt, args.new, args.beams, stop_token=None)

    def lmforge_uncached(_: int):
        return beam_search(ours, prompt, args.new, args.beams, stop_token=None, use_cache=False)

    @torch.no_grad()
    def transformers_generate(_: int):
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                               num_beams=args.beams, do_sample=False)

    outputs = [f(0) for f in (lmforge_cached, lmforge_uncached, transformers_generate)]
    assert all(o.tolist() == outputs[0].tolist() for o in outputs), "the decoders disagree"
    seconds = alternate_rounds({"lmforge": lmforge_cached, "lmforge (no cache)": lmforge_uncached,
                                "transformers": transformers_generate}, args.rounds, 1, 1e9)
    print(f"beams {args.beams}, prompt {args.prompt}, {args.new} new tokens, threads {torch.get_num_threads()}; "
          "identical outputs")
    for name, s in seconds.items():
        print(f"{name:>20}: {s * 1000:8.1f} ms per decode, {args.new / s:8.1f} tokens/s")
    print(f"lmforge cached vs uncached: {seconds['lmforge (no cache)'] / seconds['lmforge']:.2f}x")
    print(f"ratio {seconds['transformers'] / seconds['lmforge']:.2f}")


if __name__ == "__main__":
    main()
