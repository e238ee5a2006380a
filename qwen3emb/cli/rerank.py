"""``qwen3emb-export rerank``: score documents against a query with a reranker bundle, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import Precision, Provider, Verbose, configure_logging, fail
from qwen3emb.constants import EXIT_USAGE
from qwen3emb.errors import InputError


def rerank(
    bundle: Annotated[Path, typer.Argument(help="Reranker bundle directory.")],
    query: Annotated[str, typer.Argument(help="The query.")],
    documents: Annotated[list[str] | None, typer.Argument(help="Documents to score.")] = None,
    documents_file: Annotated[Path | None, typer.Option(
        "--documents", help="More documents: a .jsonl file of strings or {\"text\": ...} "
                            "objects ({\"image\": PATH, \"video\": PATH} too for Qwen3-VL), "
                            "or a text file with one document per line.")] = None,
    query_image: Annotated[Path | None, typer.Option(
        help="An image for the query (Qwen3-VL rerankers); QUERY is its text, '' for none.")
    ] = None,
    query_video: Annotated[Path | None, typer.Option(
        help="A video file for the query (Qwen3-VL rerankers).")] = None,
    instruction: Annotated[str | None, typer.Option(
        help="The task (default: the model card's web-search instruction).")] = None,
    top_n: Annotated[int | None, typer.Option(help="Print only the best N.")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per onnxruntime call.")] = 16,
    precision: Precision = "fp32",
    provider: Provider = None,
    verbose: Verbose = False,
) -> None:
    """Score documents against a query with a reranker bundle; JSON lines, best first.

    Each line is {"index", "score", "document"}: the document's position in the input
    (arguments first, then --documents), its score in (0, 1), and its text.

    Examples:

        qwen3emb-export rerank reranker "capital of France?" "Paris is the capital." "Bananas."

        qwen3emb-export rerank reranker "capital of France?" --documents hits.jsonl --top-n 10
    """
    configure_logging(verbose)
    docs: list[str | dict[str, str]] = list(documents or [])
    if documents_file is not None:
        docs += _read_documents(documents_file)
    if not docs:
        raise fail("no documents given. Pass DOCUMENT arguments or --documents FILE", EXIT_USAGE)
    from qwen3emb.runtime import open_reranker

    reranker = open_reranker(bundle, precision, provider)
    asked: str | dict[str, str] = query
    if query_image is not None or query_video is not None:
        asked = {k: str(v) for k, v in (("image", query_image), ("video", query_video))
                 if v is not None}
        if query:
            asked["text"] = query
    for index, score in reranker.rerank(asked, docs, top_n=top_n, instruction=instruction,
                                        batch_size=batch_size):
        typer.echo(json.dumps({"index": index, "score": round(score, 7),
                               "document": docs[index]}, ensure_ascii=False))


def _read_documents(path: Path) -> list[str | dict[str, str]]:
    """Documents of a ``.jsonl`` file (strings, or objects with ``text`` and, for Qwen3-VL
    rerankers, ``image`` / ``video`` file paths), else one per line.

    Raises:
        InputError: the file cannot be read, or a JSON line is neither form.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read --documents '{path}': {e}",
                         hint="Pass a UTF-8 text or .jsonl file") from e
    lines = text.splitlines()
    if path.suffix != ".jsonl":
        return lines
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number} is not JSON: {e.msg}",
                             hint='Write one JSON string or {"text": ...} per line') from e
        if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
            item = item["text"]
        visual = (isinstance(item, dict) and item and set(item) <= {"text", "image", "video"}
                  and all(isinstance(v, str) for v in item.values()))
        if not isinstance(item, str) and not visual:
            raise InputError(f"{path}:{number} is neither a string nor an object with string "
                             "\"text\", \"image\" or \"video\" (file paths)",
                             hint='Write one JSON string or {"text": ...} per line')
        out.append(item)
    return out
