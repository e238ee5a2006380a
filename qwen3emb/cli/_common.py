"""Shared CLI plumbing: logging setup, error formatting, option aliases."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from qwen3emb.constants import EXIT_INTERRUPTED, EXIT_USAGE
from qwen3emb.errors import OutputError, Qwen3EmbError

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "QWEN3EMB_DEBUG"

# Loggers of libraries that narrate every pass at INFO; kept at WARNING even with --verbose.
_NOISY = ("onnxscript", "onnx_ir", "torch", "torch.onnx", "transformers", "httpx", "filelock",
          "huggingface_hub", "urllib3")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Configure logging for the CLI only (library code never does this)."""
    level = logging.DEBUG if debug_enabled() else logging.INFO if verbose else logging.WARNING
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    quiet_libraries()
    if not debug_enabled():
        warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:  # transformers may be absent on runtime-only installs
        import importlib.util

        if importlib.util.find_spec("transformers") is not None and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def quiet_libraries() -> None:
    """Hold chatty libraries' loggers at ERROR; call again after importing them.

    torch configures its own loggers on import, so setting the parent beforehand is not enough.
    """
    import importlib.util

    if "torch" in sys.modules and importlib.util.find_spec("torch.onnx") is not None:
        import torch.onnx  # noqa: F401  (creates its loggers now, so they can be quieted)
    level = logging.DEBUG if debug_enabled() else logging.ERROR
    names = list(_NOISY) + [n for n in logging.root.manager.loggerDict
                            if n.split(".")[0] in _NOISY]
    for name in names:
        logging.getLogger(name).setLevel(level)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn known errors into one line plus a hint and their exit code; Ctrl-C into 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Qwen3EmbError as e:
            if debug_enabled():
                traceback.print_exc()
            raise fail(e.one_line(), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was left half-written", EXIT_INTERRUPTED) from None
        except OSError as e:  # a full disk, a vanished or unwritable directory mid-run
            if debug_enabled():
                traceback.print_exc()
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            error = OutputError(f"{e.strerror or e}{where}",
                                hint="Free disk space or fix permissions where the files go "
                                     "(or write elsewhere), then run again")
            raise fail(error.one_line(), error.exit_code) from None

    return wrapper  # type: ignore[return-value]


ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress",
    help="Progress bars on stderr (default: only at a terminal, never in CI).")]
LongProbeOpt = Annotated[list[int] | None, typer.Option(
    "--long-probe", help="Token length of a long-document probe, capped at the bundle's "
    "max_length (repeatable; default 2048, 8192, 32768; --long-probe 0 for none).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")]


def long_probes(values: list[int] | None) -> tuple[int, ...] | None:
    """``--long-probe`` values as the validator takes them (``None``: its default)."""
    if values is None:
        return None
    if any(v < 0 for v in values):
        raise fail(f"--long-probe {min(values)} is negative; give a token length, or 0 for "
                   "no long probes", EXIT_USAGE)
    return tuple(v for v in values if v > 0)
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")]
Provider = Annotated[
    list[str] | None,
    typer.Option("--provider", "-p",
                 help="onnxruntime provider: cpu, cuda, coreml (repeatable; CPU is the "
                      "fallback), or openvino (OpenVINO runs the whole graph; openvino:GPU)."),
]
Precision = Annotated[str, typer.Option(
    "--precision", help="Which model of the bundle: fp32 (default) or another ONNX precision, "
    "or a GGUF type such as q8_0 (runs on llama.cpp).")]
