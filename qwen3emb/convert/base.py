"""What every model family provides to the exporters and the validator."""

from __future__ import annotations

from typing import Any, ClassVar

from qwen3emb.convert.checkpoint import Checkpoint


class Family:
    """Base class for a model family. Subclasses override the small hooks below."""

    model_type: ClassVar[str] = ""
    modality: ClassVar[str] = "text"
    task: ClassVar[str] = "embed"
    """What the bundle computes (``qwen3emb.constants.TASKS``)."""
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

    @property
    def default_max_length(self) -> int:
        """A bundle's ``max_length`` when the user sets none: all the checkpoint reads."""
        return self.max_positions

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

    def layer_plan(self, graph: str) -> tuple[str, int, int] | None:
        """How the streamed exporter may trace graph ``graph`` shallow and copy one traced
        layer to the full depth (:attr:`num_layers`), or ``None`` to trace every layer.

        Returns:
            ``(scope, template, tail)``: the layer list's module path in the graph module
            (``backbone.layers``), the layer to copy (layers ``0..template`` are traced; layer
            0 computes what all layers share, so ``template >= 1``), and 1 when a different
            last layer is traced after it (:attr:`pooled_last_layer`), else 0.
        """
        if not self.uniform_layers():
            return None
        return f"backbone.{self.layers_scope}", 1, int(self.pooled_last_layer)

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        """Values of buffers that are computed, not stored (e.g. rotary frequencies), as numpy
        arrays keyed by their name in ``backbone``; a meta backbone has none of them."""
        return {}

    def backbone_name(self, graph: str, name: str) -> str:
        """The backbone parameter (or buffer) behind initializer ``name`` of graph ``graph``.

        The graph module of :meth:`graph_module` holds the backbone (or a part of it) under an
        attribute of its own; this undoes that prefix. By default the embedding module holds
        the whole backbone as ``self.backbone``.
        """
        return name.removeprefix("backbone.")

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

    # --- what the bundle writer asks of a family (qwen3emb.export.bundle) ----------------

    default_int8_scheme: ClassVar[str] = "smoothquant"
    """The int8 recipe (``qwen3emb.export.quant.quantize.INT8_SCHEMES``) unless the user
    forces one."""

    fidelity_search: ClassVar[bool] = True
    """Build int8 / int4 by the accuracy-driven search (``qwen3emb.export.quant.search``),
    starting from ``default_int8_scheme``, unless the user forces a scheme."""

    def graph_quantization(self, graph: str, forced: str | None) -> tuple[str, bool]:
        """How graph ``graph``'s int8 / int4 variants are built.

        Args:
            graph: a name from :meth:`graph_specs`.
            forced: the int8 scheme the user forced (``--int8-scheme``), or ``None``.

        Returns:
            ``(int8 scheme, search)``: the recipe, and whether the accuracy-driven search
            starts from it (:mod:`qwen3emb.export.quant.search`) instead of applying it as is.
        """
        if forced is not None:
            return forced, False
        return self.default_int8_scheme, self.fidelity_search

    support_files: ClassVar[tuple[str, ...]] = ()
    """Checkpoint files copied into the bundle besides the tokenizer files, when present."""

    @property
    def streamable(self) -> bool:
        """Whether the ONNX exporter may trace each graph of :meth:`graph_specs` on the meta
        device (:meth:`meta_backbone`, :meth:`graph_module`, :meth:`trace_inputs`) and stream
        its weights from the shards (:meth:`backbone_name`, :meth:`checkpoint_key`,
        :meth:`host_buffers`; :func:`qwen3emb.export.onnx.trace.export_onnx`); otherwise each
        graph is traced from the loaded fp32 backbone."""
        return False

    def graph_specs(self, dim: int, opset: int) -> tuple[Any, ...]:
        """The ONNX graphs of a bundle (``qwen3emb.spec`` contracts), the embedding graph last.

        Args:
            dim: output width of the embedding graph.
            opset: ONNX opset.
        """
        raise NotImplementedError

    def graph_module(self, backbone: Any, graph: str, dimensions: int | None) -> Any:
        """The torch module behind graph ``graph`` (the embedding graph by default)."""
        return self.embedding_module(backbone, dimensions)

    def trace_inputs(self, graph: str, spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Example inputs and ``torch.export`` dynamic shapes for tracing graph ``graph``.

        The streamed exporter moves them to the meta device, so tracing may not depend on
        their values."""
        raise NotImplementedError

    def graph_precisions(self, graph: str, precisions: list[str]) -> list[str]:
        """Which of the requested ONNX precisions graph ``graph`` is written in."""
        return precisions

    def graph_entry(self, graph: str) -> dict[str, Any]:
        """Manifest keys of graph ``graph``'s model entries."""
        return {"role": "model"}

    def pair_entries(self, entries: list[dict[str, Any]]) -> None:
        """Link the entries of a multi-graph bundle to each other (in place)."""

    def check_tokenizer(self, tokenizer: Any) -> dict[str, Any]:
        """Check the checkpoint's ``tokenizers.Tokenizer`` against the contract.

        Returns:
            Tokenizer facts for the manifest.

        Raises:
            CheckpointError: the tokenizer would make the embedding wrong.
        """
        raise NotImplementedError

    def manifest_sections(self, out_dim: int, *, onnx: bool, gguf: bool) -> dict[str, Any]:
        """The family's manifest sections (``embedding``, ``prompt``, and any of its own).

        Args:
            out_dim: the width the bundle emits.
            onnx / gguf: which formats the bundle holds.
        """
        raise NotImplementedError

    # --- what other tools' loaders read (qwen3emb.export.bundle.interop) -------------------

    interop_tools: ClassVar[tuple[str, ...]] = ()
    """Tools whose loaders read this family's bundles with no code of ours (keys of
    ``qwen3emb.export.bundle.interop.TOOLS``); the writer lays out their files."""

    def gguf_options(self) -> dict[str, Any]:
        """Keyword arguments of the family's GGUF writer beyond the common ones (a reranker's
        head); empty for embedders."""
        return {}

    def loader_config(self) -> dict[str, Any]:
        """``config.json`` for other loaders: the checkpoint's own configuration."""
        return dict(self.config)

    def prompts(self) -> dict[str, str]:
        """Named prompts prepended to texts by tools that support them (sentence-transformers'
        ``prompt_name``); empty when the family has none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Family facts for the manifest."""
        return {
            "family": self.model_type,
            "modality": self.modality,
            "task": self.task,
            "architectures": list(self.config.get("architectures") or []),
        }
