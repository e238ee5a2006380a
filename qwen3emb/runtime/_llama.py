"""The llama.cpp shared library, reached through llama-cpp-python's ctypes mirror of llama.h.

The binding (the ``gguf`` extra) builds llama.cpp from source when installed. This module
imports it once, initialises the backend and routes llama.cpp's log lines to ``logging``
instead of stderr, keeping the last few so that a failure can quote llama.cpp's own reason.
Torch-free.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from typing import Any

from qwen3emb.errors import MissingDependencyError

logger = logging.getLogger(__name__)

BINDING = "llama-cpp-python"
"""The PyPI name of the binding, for messages."""

_lock = threading.Lock()
_loaded: dict[str, Any] = {}
_recent: deque[str] = deque(maxlen=40)
_partial: list[str] = []
_partial_level = [0]

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
# All of it goes to DEBUG: llama.cpp is chatty, and its errors reach users through ours.
_TAGS = {3: "W", 4: "E"}


def llama_library() -> Any:
    """Return llama-cpp-python's low-level module (``llama_cpp.llama_cpp``), initialised.

    Raises:
        MissingDependencyError: the binding is not installed or its library does not load;
            the message names the ``gguf`` extra.
    """
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        try:
            from llama_cpp import llama_cpp as lib
        except ImportError as e:
            raise MissingDependencyError(
                f"the llama.cpp binding '{BINDING}' is not installed, and GGUF k-quants and "
                "the GGUF runtime need it",
                hint="Install it with: pip install 'qwen3emb-export[gguf]' (builds llama.cpp, "
                     "a few minutes)",
            ) from e
        except (OSError, RuntimeError) as e:  # the shared library itself failed to load
            raise MissingDependencyError(
                f"the llama.cpp library of '{BINDING}' could not be loaded: {e}",
                hint="Reinstall it with: pip install --force-reinstall --no-cache-dir "
                     "'qwen3emb-export[gguf]'",
            ) from e
        callback = lib.llama_log_callback(_on_log)
        lib.llama_log_set(callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
        _loaded.update(lib=lib, callback=callback)  # the callback must outlive every call
        return lib


def mtmd_library() -> Any:
    """Return llama-cpp-python's ctypes mirror of libmtmd (``llama_cpp.mtmd_cpp``), its log
    routed like llama.cpp's.

    Raises:
        MissingDependencyError: the binding or its libmtmd is missing; names the extra.
    """
    lib = llama_library()
    with _lock:
        if "mtmd" in _loaded:
            return _loaded["mtmd"]
        try:
            from llama_cpp import mtmd_cpp as mtmd
        except (ImportError, OSError, RuntimeError) as e:
            raise MissingDependencyError(
                f"the multimodal library (libmtmd) of '{BINDING}' could not be loaded: {e}",
                hint="Reinstall it with: pip install --force-reinstall --no-cache-dir "
                     "'qwen3emb-export[gguf]'",
            ) from e
        callback = _loaded["callback"]
        mtmd.mtmd_log_set(callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
        del lib
        _loaded["mtmd"] = mtmd
        return mtmd


def last_llama_errors(n: int = 3) -> str:
    """The last ``n`` error or warning lines llama.cpp logged, joined; empty if none."""
    lines = [line for line in _recent if line.startswith(("E ", "W "))]
    return " | ".join(line[2:] for line in lines[-n:])


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    if not text:
        return
    piece = text.decode("utf-8", errors="replace")
    if not _partial and int(level) != 5:
        _partial_level[0] = int(level)
    _partial.append(piece)
    if not piece.endswith("\n"):
        return
    line = "".join(_partial).rstrip()
    _partial.clear()
    if line:
        _recent.append(f"{_TAGS.get(_partial_level[0], 'I')} {line}")
        logger.debug("llama.cpp: %s", line)


class NativeHandle:
    """Context-manager plumbing for objects that own llama.cpp memory: ``close()`` frees it,
    on ``with`` exit and on garbage collection."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def embedding_context(lib: Any, model: Any, size: int, n_seqs: int, n_threads: int,
                      hint: str, pooling: int | None = None) -> Any:
    """A llama.cpp context for pooled outputs (last token unless ``pooling`` says otherwise:
    a reranker's rank pooling) whose physical batch equals its context (``size`` tokens), so
    no input is split across micro-batches.

    Raises:
        Qwen3EmbError: llama.cpp could not allocate it (its own reason quoted).
    """
    from qwen3emb.errors import Qwen3EmbError

    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = size
    params.n_seq_max = n_seqs
    params.kv_unified = True  # sequences share the cells, so any one of them can be long
    params.embeddings = True
    params.pooling_type = lib.LLAMA_POOLING_TYPE_LAST if pooling is None else pooling
    params.n_threads = params.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise Qwen3EmbError(f"llama.cpp could not create a context of {size} tokens: "
                            f"{last_llama_errors() or 'no message'}", hint=hint)
    return ctx


def load_model_problem(lib: Any, path: Any) -> str | None:
    """Load a GGUF model in llama.cpp (memory-mapped, so no weight is read) and free it.

    Returns:
        ``None`` when it loads, else llama.cpp's reason in one line.
    """
    params = lib.llama_model_default_params()
    params.use_mmap = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return f"llama.cpp refuses it: {last_llama_errors() or 'no message'}"
    lib.llama_model_free(model)
    return None
