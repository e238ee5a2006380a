"""An OpenAI-compatible embeddings server for bundles (the ``serve`` extra).

    >>> from qwen3emb.serve import ServeSettings, create_app
    >>> app = create_app(ServeSettings(bundle=Path("bundle/")))   # run with uvicorn

Split like TEI's router: :mod:`~qwen3emb.serve.app` (HTTP handlers),
:mod:`~qwen3emb.serve.schemas` (wire format), :mod:`~qwen3emb.serve.batcher` (the queue that
forms batches), :mod:`~qwen3emb.serve.backend` (the runtime's embedders).
"""

from __future__ import annotations

from qwen3emb.errors import require

for _module in ("fastapi", "prometheus_client"):
    require(_module, "serve")  # one line naming the extra, not a bare ModuleNotFoundError

from qwen3emb.serve.app import create_app  # noqa: E402
from qwen3emb.serve.settings import ServeSettings  # noqa: E402

__all__ = ["ServeSettings", "create_app"]
