#!/usr/bin/env python3
"""How far a text's embedding moves with its batch mates, per precision of a bundle.

Twelve texts of mixed lengths are embedded alone, in one padded batch, and each beside the
longest one; the figure is the worst 1 - cosine against "alone", after L2 normalization (fp16
graphs return norms up to 4.5e-4 off 1, which is not batch dependence). The server's policy
(``qwen3emb.serve.backend.BATCH_INDEPENDENT_ONNX``) comes from these numbers:

    python scripts/bench.py batch-independence BUNDLE
"""

from __future__ import annotations

import sys

import numpy as np

from qwen3emb.manifest import read_manifest
from qwen3emb.runtime import GGUFTextEmbedder, TextEmbedder

WORDS = ("the a cat dog sat on mat river bank money finance quantum physics embedding vector "
         "model of and").split()


def worst(alone: np.ndarray, other: np.ndarray) -> float:
    a = alone / np.linalg.norm(alone, axis=1, keepdims=True)
    b = other / np.linalg.norm(other, axis=1, keepdims=True)
    return float(np.max(1 - np.sum(a * b, axis=1)))


def main() -> int:
    bundle = sys.argv[1]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=n))
             for n in (1, 3, 7, 15, 30, 60, 120, 200, 5, 9, 40, 80)]
    manifest = read_manifest(bundle)
    print("model      batch-of-12  beside-the-longest")
    for precision in manifest.models("onnx"):
        e = TextEmbedder(bundle, precision=precision)
        ids = e.tokenize(texts)
        longest = max(ids, key=len)
        alone = np.concatenate([e.run_ids(*e.pad([r])) for r in ids])
        batched = e.run_ids(*e.pad(ids))
        mates = np.concatenate([e.run_ids(*e.pad([r, longest]))[:1] for r in ids])
        print(f"onnx {precision:5s}  {worst(alone, batched):.1e}      {worst(alone, mates):.1e}")
    for gguf_type in manifest.models("gguf"):
        g = GGUFTextEmbedder(bundle, gguf_type=gguf_type)
        ids = [g.tokenize(t) for t in texts]
        longest = max(ids, key=len)
        alone = np.concatenate([g.embed_ids([r]) for r in ids])
        batched = g.embed_ids(ids)
        mates = np.concatenate([g.embed_ids([r, longest])[:1] for r in ids])
        print(f"gguf {gguf_type:5s}  {worst(alone, batched):.1e}      {worst(alone, mates):.1e}")
        g.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
