#!/usr/bin/env python3
"""Write a random-weight Qwen3 embedding checkpoint of a real shape straight to safetensors.

Costs what the weights cost on disk (bf16) and about one shard of memory, never the model:

    python scripts/make_random_checkpoint.py --preset 8B -o /tmp/qwen3-8b-random

Presets: tiny, small, 0.6B, 4B, 8B (shapes from shared/CONTRACT.md). The tokenizer has the real
151669-token layout (special tokens at their real ids) unless --vocab-size says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qwen3emb.convert.random_checkpoint import PRESETS, REAL_VOCAB_SIZE, write_random_shards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.6B")
    parser.add_argument("--vocab-size", type=int, default=REAL_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    if args.output.exists() and any(args.output.iterdir()):
        print(f"error: '{args.output}' is not empty. Choose a new directory", file=sys.stderr)
        return 2
    start = time.perf_counter()
    done = [0]

    def progress(name: str, nbytes: int) -> None:
        done[0] += nbytes
        if sys.stderr.isatty():
            print(f"\r{done[0] / 1e9:6.2f} GB  {name:<50}", end="", file=sys.stderr)

    write_random_shards(args.output, preset=args.preset, vocab_size=args.vocab_size,
                        seed=args.seed, shard_bytes=int(args.shard_gb * (1 << 30)),
                        progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"wrote {args.preset} checkpoint ({done[0] / 1e9:.2f} GB bf16) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
