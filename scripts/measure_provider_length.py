"""One engine, one graph, one text of N tokens: the first call's time and the process's peak RSS.

    python scripts/measure_provider_length.py GRAPH.onnx cpu|openvino TOKENS

Run each engine in its own process (peak RSS is per process); docs/precisions.md has the table.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from qwen3emb.progress import peak_rss_bytes
from qwen3emb.runtime.session import open_session

graph, provider, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = open_session(Path(graph), provider, 2)
rng = np.random.default_rng(3)
ids = rng.integers(0, 151643, (1, length)).astype(np.int64)
ids[0, -1] = 151643
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
t = time.perf_counter()
s.run(["sentence_embedding"], feed)
first = time.perf_counter() - t
print(
    json.dumps(
        {
            "graph": Path(graph).name,
            "provider": provider,
            "tokens": length,
            "seconds": round(first, 2),
            "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2),
        }
    )
)
