"""Run the app with uvicorn: graceful drain on SIGTERM, exit status 0 afterwards."""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from types import FrameType

from qwen3emb.serve.backend import Backend
from qwen3emb.serve.settings import ServeSettings, is_loopback

logger = logging.getLogger(__name__)


def run_server(settings: ServeSettings | Sequence[ServeSettings],
               backend: Backend | Sequence[Backend], *, host: str = "127.0.0.1",
               port: int = 8000, drain_timeout: int = 30, access_log: bool = False) -> None:
    """Serve ``backend`` until SIGTERM or Ctrl-C.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (at most
    ``drain_timeout`` seconds), runs the app's shutdown (batcher, backend) and returns, so the
    process exits 0. Ctrl-C does the same, then raises ``KeyboardInterrupt``.

    Args:
        settings: the server's settings, one per served bundle.
        backend: the loaded models, likewise (see :func:`~qwen3emb.serve.backend.load_backend`).
        host, port: where to listen; loopback by default.
        drain_timeout: seconds to wait for in-flight requests on shutdown.
        access_log: log one line per request (at INFO).
    """
    import uvicorn

    from qwen3emb.serve.app import create_app

    first = settings if isinstance(settings, ServeSettings) else settings[0]
    if not first.api_keys and not is_loopback(host):
        logger.warning("listening on %s without API keys: anyone who reaches this port can "
                       "use the model (add --api-key-file)", host)
    app = create_app(settings, backend)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on",
                            access_log=access_log, timeout_graceful_shutdown=max(1, drain_timeout),
                            server_header=False)
    server = uvicorn.Server(config)

    def drained(sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal it shut down for once it is done; by then the
        # requests have drained, so SIGTERM ends here and the process exits 0.
        logger.info("drained after signal %d; exiting", sig)

    previous = signal.signal(signal.SIGTERM, drained)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
