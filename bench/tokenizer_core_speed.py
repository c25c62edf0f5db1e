"""How fast the Rust tokenizer itself encodes, per core: the ceiling of any tokenization pipeline here.

Trains the same byte-level BPE (vocab 8,192) as bench/prepare_throughput.py on gcide, then encodes
~6 MB of gcide paragraphs (not in the training sample) in batches of 1,000 with `encode_batch` and
`encode_batch_fast` (no offsets), alternating, on one thread. Run it twice: the second time with
TOKENIZERS_PARALLELISM=true to see what the Rust threads add on all cores.

    TOKENIZERS_PARALLELISM=false .venv/bin/python bench/tokenizer_core_speed.py
"""

from __future__ import annotations

import os
import time

from common import gcide_bpe_tokenizer, gcide_text


def main() -> None:
    text = gcide_text()
    tokenizer = gcide_bpe_tokenizer(text)
    documents = text[25_000_000:31_000_000].split("\n\n")
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    print(f"{megabytes:.1f} MB of gcide paragraphs, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}, {os.cpu_count()} CPUs")
    rates: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": []}
    for _ in range(3):
        for name in rates:
            encode = getattr(tokenizer, name)
            started = time.perf_counter()
            for i in range(0, len(documents), 1000):
                encode(documents[i:i + 1000], add_special_tokens=False)
            rates[name].append(megabytes / (time.perf_counter() - started))
    for name, values in rates.items():
        print(f"{name:<18} best {max(values):.2f} MB/s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
