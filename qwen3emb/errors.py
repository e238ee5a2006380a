"""Typed errors. Each carries a one-line message and a fix; the CLI prints both.

Importable without torch: the runtime raises these too.
"""

from __future__ import annotations

from qwen3emb.constants import EXIT_PARITY_FAILED, EXIT_USAGE


class Qwen3EmbError(Exception):
    """Base class: a problem a user can fix. ``hint`` says how."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the hint as a single line."""
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else text


class InputError(Qwen3EmbError):
    """Bad arguments or inputs: empty text, dimensions out of range, unknown precision."""


class CheckpointError(Qwen3EmbError):
    """The source checkpoint is missing, unreadable, corrupt or of an unsupported family."""


class UnsupportedModelError(CheckpointError):
    """config.json names a model_type this tool does not export."""


class BundleError(Qwen3EmbError):
    """A bundle is missing files, has a bad manifest or files whose hashes do not match."""


class OutputError(Qwen3EmbError):
    """The output path exists, is not writable, or the write failed."""


class ProviderError(Qwen3EmbError):
    """An onnxruntime execution provider that is not available was requested."""


class MissingDependencyError(Qwen3EmbError):
    """An optional dependency is not installed; the message names the extra."""


class ParityError(Qwen3EmbError):
    """One or more artifacts fell below their fidelity floor."""

    exit_code = EXIT_PARITY_FAILED


def require(module: str, extra: str = "export") -> None:
    """Raise MissingDependencyError if ``module`` cannot be imported.

    Args:
        module: the import name, e.g. ``"torch"``.
        extra: the ``qwen3emb-export`` extra that provides it.

    Raises:
        MissingDependencyError: naming the extra to install.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"'{module}' is not installed, and this command needs it",
            hint=f"Install it with: pip install 'qwen3emb-export[{extra}]'",
        )
