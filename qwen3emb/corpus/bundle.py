"""Check a bundle against a corpus job's options, and the files the job will load, once."""

from __future__ import annotations

from typing import Any

from qwen3emb.corpus.options import CorpusOptions
from qwen3emb.errors import BundleError, InputError
from qwen3emb.manifest import Manifest, sha256_file


def check_bundle(manifest: Manifest, options: CorpusOptions) -> bool:
    """Check the options against the bundle, and the sha256 of every file the job loads.

    The driver does this once; actors then only compare the manifest's sha256. Files the job
    does not load (the other precisions' graphs, GGUF files) are not hashed: for a 0.6B bundle
    that skips the 2.4 GB fp32 graph when embedding with int8.

    Returns:
        Whether the bundle is a Qwen3-VL bundle.

    Raises:
        InputError: an option the bundle does not support.
        BundleError: a file the job loads is missing or does not match its sha256.
    """
    vision = "vision" in manifest.data
    if options.image_column and not vision:
        raise InputError("--image-column needs a Qwen3-VL bundle",
                         hint="Drop --image-column, or pass a Qwen3-VL bundle")
    if vision and options.query:
        raise InputError("--query is for text bundles",
                         hint="With a Qwen3-VL bundle, pass --instruction instead")
    if not vision and options.instruction is not None and not options.query:
        raise InputError("--instruction applies to queries with a text bundle",
                         hint="Add --query, or drop --instruction")
    dim, low = int(manifest.embedding["output_dim"]), manifest.mrl_min
    if options.dimensions is not None and not low <= options.dimensions <= dim:
        raise InputError(f"--dimensions {options.dimensions} is outside this bundle's "
                         f"Matryoshka range {low}..{dim}", hint=f"Choose {low} to {dim}")
    for entry in used_files(manifest, options.precision, vision):
        path = manifest.root / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] \
                or sha256_file(path) != entry["sha256"]:
            raise BundleError(f"bundle file '{path}' is missing or does not match its sha256",
                              hint="Re-run the export; do not edit bundle files by hand")
    return vision


def used_files(manifest: Manifest, precision: str, vision: bool) -> list[dict[str, Any]]:
    """Manifest entries of the files an embedder of ``precision`` loads: its graph(s) with
    their external data, and the files of no precision (tokenizer, configs).

    Raises:
        InputError: the bundle has no ONNX model of ``precision``.
    """
    if vision:
        from qwen3emb.runtime.vl import choose_graphs

        graphs = [g["path"] for g in choose_graphs(manifest, precision)]
    else:
        models = manifest.models("onnx")
        if precision not in models:
            raise InputError(f"bundle has no '{precision}' ONNX model",
                             hint=f"Available precisions: {', '.join(sorted(models)) or 'none'}")
        graphs = [models[precision]["path"]]
    return [a for a in manifest.artifacts
            if any(a["path"] == g or a["path"].startswith(g + ".") for g in graphs)
            or (a.get("precision") is None and a.get("kind") not in ("onnx", "gguf"))]
