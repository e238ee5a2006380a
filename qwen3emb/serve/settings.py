"""What a server is started with: one frozen dataclass, checked on creation."""

from __future__ import annotations

import functools
import hmac
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from qwen3emb.errors import InputError

CPU_BATCH = (2048, 8)
"""Padded tokens and sequences per call on CPU (onnxruntime's CPU provider, llama.cpp).
Measured CPU time per text on a 4-layer, 512-wide model (docs/serve.md): ~40-token texts cost
8.5 ms in calls of 4-8 against 11.7 alone and 10.3 in calls of 32; ~300-token texts cost 76 ms
alone, 82-84 in calls of 2-8 and 111 in calls of 32 (padding, attention scores out of cache)."""
ACCELERATOR_BATCH = (16384, 32)
"""The same for GPU and other providers, where large calls pay (TEI's defaults)."""
DEFAULT_MAX_INPUTS = 2048
"""OpenAI's own cap on inputs per embeddings request."""
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_QUEUE_TOKENS = 2**18
"""Above OpenAI's 300k-token cap per request would never fit; 2**18 is a few minutes of CPU."""
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
"""Room for a few data: URI images per request."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``create_app`` needs; the CLI builds it from its options.

    Args:
        bundle: the bundle directory.
        precision: ONNX precision or GGUF type to serve; ``None``: fp32 ONNX, or the bundle's
            highest-precision GGUF when it has no ONNX model.
        providers: onnxruntime providers (short or full names), or ``openvino``; CPU when
            empty.
        model_name: the ``model`` clients must send; default the bundle directory's name.
        api_keys: accepted bearer keys; empty: no authentication.
        max_batch_tokens: padded tokens per inference call; ``None``: ``CPU_BATCH`` on CPU,
            ``ACCELERATOR_BATCH`` otherwise.
        max_batch_size: sequences per inference call; ``None``: likewise.
        batch_wait_ms: how long an idle batcher waits for more requests before a batch runs;
            0: it only lets requests already received join (while a batch runs, the next one
            fills up anyway, so waiting only adds latency to lone requests).
        max_inputs: inputs per request.
        max_tokens: tokens per input (end token and instruction included); default and upper
            bound the bundle's ``max_length``.
        max_queue: requests waiting or running at once; more get 429.
        max_queue_tokens: tokens waiting or running at once; a request with more gets 413.
        max_body_bytes: request body cap; larger bodies get 413.
        threads: inference threads (onnxruntime intra-op or llama.cpp).
        default_task: task of ``input_type: "query"`` inputs sent without ``instruction``.
        allow_files: directory under which VL items may name image/video files.
        single_sequence: run one sequence per inference call (True) or batch them (False);
            ``None`` decides from the model (see ``backend.single_sequence_default``).

    Raises:
        InputError: a limit below 1, or an empty key.
    """

    bundle: Path
    precision: str | None = None
    providers: tuple[str, ...] = ()
    model_name: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    batch_wait_ms: float = 0.0
    max_inputs: int = DEFAULT_MAX_INPUTS
    max_tokens: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    threads: int | None = None
    default_task: str | None = None
    allow_files: Path | None = None
    single_sequence: bool | None = None

    def __post_init__(self) -> None:
        limits = {"max_batch_tokens": self.max_batch_tokens,
                  "max_batch_size": self.max_batch_size, "max_inputs": self.max_inputs,
                  "max_queue": self.max_queue, "max_body_bytes": self.max_body_bytes,
                  "threads": self.threads, "max_queue_tokens": self.max_queue_tokens}
        bad = [f"--{k.replace('_', '-')}={v}" for k, v in limits.items()
               if v is not None and v < 1]
        if self.max_tokens is not None and self.max_tokens < 2:
            bad.append(f"--max-tokens={self.max_tokens}")
        if self.batch_wait_ms < 0:
            bad.append(f"batch_wait_ms={self.batch_wait_ms}")
        if bad:
            raise InputError(f"limits must be positive: {', '.join(bad)}",
                             hint="Choose values of at least 1 (max tokens: at least 2)")
        if any(not k for k in self.api_keys):
            raise InputError("an API key is empty", hint="Remove blank keys from the key file")
        if self.default_task is not None and not self.default_task.strip():
            raise InputError("the default task is empty", hint="Omit --task to use the default")
        if self.allow_files is not None and not Path(self.allow_files).is_dir():
            raise InputError(f"--allow-files '{self.allow_files}' is not a directory",
                             hint="Name an existing directory of images/videos")

    def batch_limits(self, on_cpu: bool) -> tuple[int, int]:
        """Padded tokens and sequences per inference call: the options, else the defaults of
        the device (see ``CPU_BATCH``)."""
        tokens, size = CPU_BATCH if on_cpu else ACCELERATOR_BATCH
        return self.max_batch_tokens or tokens, self.max_batch_size or size

    @functools.cached_property
    def served_name(self) -> str:
        """The model name clients must send (resolved once: it is read on every request)."""
        return self.model_name or Path(self.bundle).resolve().name

    def key_matches(self, presented: str) -> bool:
        """Compare ``presented`` with every key in constant time (no early exit)."""
        given = presented.encode()
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key.encode())
        return matched


def read_api_keys(path: Path) -> tuple[str, ...]:
    """Keys from a file, one per line; blank lines and ``#`` comments are skipped.

    Raises:
        InputError: the file is missing, unreadable or holds no key.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read the API key file '{path}': {e.strerror or e}",
                         hint="Pass a readable file with one key per line") from e
    keys = tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
    if not keys:
        raise InputError(f"the API key file '{path}' holds no key",
                         hint="Put one key per line, or drop --api-key-file")
    return keys


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only the local machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
