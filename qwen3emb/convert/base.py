"""What every model family provides to the exporters and the validator."""

from __future__ import annotations

from typing import Any, ClassVar

from qwen3emb.convert.checkpoint import Checkpoint


class Family:
    """Base class for a model family. Subclasses override the small hooks below."""

    model_type: ClassVar[str] = ""
    modality: ClassVar[str] = "text"
    mrl_min: ClassVar[int] = 32

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config

    @property
    def embedding_dim(self) -> int:
        """Width of the full embedding (the hidden size)."""
        return int(self.config["hidden_size"])

    @property
    def max_positions(self) -> int:
        """Longest input the checkpoint supports."""
        return int(self.config.get("max_position_embeddings", 0)) or 1 << 31

    def load_backbone(self, dtype: Any = None) -> Any:
        """Load the HF backbone (no LM head) in ``dtype`` (fp32 by default), in eval mode."""
        raise NotImplementedError

    def meta_backbone(self, num_layers: int | None = None) -> Any:
        """Build the backbone from config.json with weightless (meta) parameters, for tracing.

        Args:
            num_layers: keep only the first ``num_layers`` decoder layers (``None`` = all).
        """
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Depth of the decoder."""
        return int(self.config["num_hidden_layers"])

    layers_scope: ClassVar[str] = "layers"
    """Module path of the decoder's layer list inside the backbone."""

    def uniform_layers(self) -> bool:
        """Whether every decoder layer computes the same graph (only the weights differ), so an
        exporter may trace a shallow copy and replicate one layer. ``False`` when unsure."""
        return False

    @property
    def pooled_last_layer(self) -> bool:
        """Whether :meth:`embedding_module` computes only the pooled row in the last layer (its
        graph's last layer then differs from the others)."""
        return False

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        """Values of buffers that are computed, not stored (e.g. rotary frequencies), as numpy
        arrays keyed by their name in ``backbone``; a meta backbone has none of them."""
        return {}

    def checkpoint_key(self, name: str, available: Any) -> str | None:
        """The checkpoint tensor behind backbone parameter ``name`` (``None`` if absent).

        Released Qwen3-Embedding checkpoints have no ``model.`` prefix; accept both.
        """
        for key in (name, f"model.{name}"):
            if key in available:
                return key
        return None

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> Any:
        """Wrap ``backbone`` so it maps the graph inputs to the normalized embedding."""
        raise NotImplementedError

    def bundle_writer(self) -> Any:
        """A function that writes this family's bundle, or ``None`` for the text bundle.

        Multi-graph families return ``f(checkpoint, family, out, **options) -> ExportResult``
        taking the options of :func:`qwen3emb.export.export_bundle` (``formats`` checked,
        ``gguf_types`` lower-cased, ``max_length`` resolved).
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Family facts for the manifest."""
        return {
            "family": self.model_type,
            "modality": self.modality,
            "architectures": list(self.config.get("architectures") or []),
        }
