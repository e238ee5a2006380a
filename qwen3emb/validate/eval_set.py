"""BEIR-format retrieval sets: read one a user brings, or write the tiny built-in one.

A BEIR set is a directory with ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``,
``score``, after a header line). Reading follows BEIR's ``GenericDataLoader``: only queries that
have judgments in the split are evaluated, and a document's text is ``title + " " + text``
(stripped), so scores are comparable with published BEIR numbers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3emb.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "test"
LAYOUT_HINT = ("A BEIR set is a directory with corpus.jsonl, queries.jsonl and "
               "qrels/<split>.tsv (see docs/eval-set.md)")


@dataclass(frozen=True)
class EvalSet:
    """A loaded retrieval set: documents, the judged queries of one split, and their qrels.

    Attributes:
        path: the directory it was read from.
        split: the qrels split (``qrels/<split>.tsv``).
        doc_ids / doc_texts: the corpus, ``title + " " + text`` per document.
        query_ids / query_texts: the queries that have judgments in ``split``.
        qrels: ``{query_id: {doc_id: relevance}}`` as in the TSV (0 = judged not relevant).
        skipped_documents: ids of documents with neither title nor text (they cannot be
            embedded; BEIR would embed an empty string).
    """

    path: Path
    split: str
    doc_ids: tuple[str, ...]
    doc_texts: tuple[str, ...]
    query_ids: tuple[str, ...]
    query_texts: tuple[str, ...]
    qrels: dict[str, dict[str, int]] = field(hash=False)
    skipped_documents: tuple[str, ...] = ()

    @property
    def judgments(self) -> int:
        return sum(len(docs) for docs in self.qrels.values())


def document_text(title: str, text: str) -> str:
    """A document as the model sees it: ``title + " " + text``, stripped (BEIR's convention);
    documents get no instruction."""
    return f"{title} {text}".strip()


def _read_jsonl(path: Path, keys: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, each checked to hold ``keys`` as strings."""
    if not path.is_file():
        raise InputError(f"eval set has no {path.name} (looked for '{path}')", hint=LAYOUT_HINT)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                rows.append(_parse_row(path, number, line, keys, what, seen))
    except UnicodeDecodeError as e:
        raise InputError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start})",
                         hint="Save it as UTF-8 JSON lines") from e
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror or e}",
                         hint="Check the file's permissions") from e
    if not rows:
        raise InputError(f"'{path}' has no {what}s", hint=f"Put one JSON object per line, "
                         f"with {', '.join(keys)}")
    return rows


def _parse_row(path: Path, number: int, line: str, keys: tuple[str, ...], what: str,
               seen: set[str]) -> dict[str, Any]:
    fix = f"Each line of {path.name} must be a JSON object with " + ", ".join(
        f'"{k}"' for k in keys) + " (strings)"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"'{path}' line {number} is not valid JSON ({e.msg})", hint=fix) from e
    if not isinstance(row, dict):
        raise InputError(f"'{path}' line {number} is not a JSON object", hint=fix)
    if "title" in keys:
        row.setdefault("title", "")  # BEIR's corpora omit empty titles now and then
    for key in keys:
        if not isinstance(row.get(key), str):
            raise InputError(f"'{path}' line {number} has no string \"{key}\"", hint=fix)
    if row["_id"] in seen:
        raise InputError(f"'{path}' line {number} repeats the {what} id '{row['_id']}'",
                         hint=f"Give every {what} a unique \"_id\"")
    seen.add(row["_id"])
    return row


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``qrels/<split>.tsv``: a header line, then ``query-id <TAB> corpus-id <TAB> score``."""
    fix = ("qrels files have a header line, then query-id<TAB>corpus-id<TAB>integer score "
           "per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read '{path}': {e}", hint=fix) from e
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            raise InputError(f"'{path}' line {number} has {len(parts)} tab-separated fields, "
                             "not 3", hint=fix)
        qid, did, score = (p.strip() for p in parts)
        try:
            value = int(score)
        except ValueError:
            if number == 1:  # the header line (BEIR: query-id, corpus-id, score)
                continue
            raise InputError(f"'{path}' line {number} has the score {score!r}, not an integer",
                             hint=fix) from None
        qrels.setdefault(qid, {})[did] = value
    if not any(v > 0 for docs in qrels.values() for v in docs.values()):
        raise InputError(f"'{path}' judges no document relevant (no score > 0)", hint=fix)
    return qrels


def load_eval_set(path: str | os.PathLike[str], split: str = DEFAULT_SPLIT) -> EvalSet:
    """Read a BEIR-format set; keep the queries judged in ``split``.

    Args:
        path: the set's directory.
        split: which ``qrels/<split>.tsv`` to use.

    Returns:
        The set, documents in file order.

    Raises:
        InputError: a missing or malformed file, a duplicate id, or a query in the qrels that
            ``queries.jsonl`` lacks; the message names the file, the line and the fix.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"eval set '{root}' is not a directory", hint=LAYOUT_HINT)
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        hint = (f"Splits in this set: {', '.join(found)}; choose one with --eval-split"
                if found else LAYOUT_HINT)
        raise InputError(f"eval set has no qrels for split '{split}' (looked for "
                         f"'{qrels_path}')", hint=hint)
    corpus = _read_jsonl(root / "corpus.jsonl", ("_id", "title", "text"), "document")
    queries = {q["_id"]: q["text"] for q in
               _read_jsonl(root / "queries.jsonl", ("_id", "text"), "query")}
    qrels = _read_qrels(qrels_path)
    if missing := [q for q in qrels if q not in queries]:
        raise InputError(f"'{qrels_path}' judges {len(missing)} queries that queries.jsonl "
                         f"lacks (first: '{missing[0]}')",
                         hint="Add them to queries.jsonl or remove their qrels lines")
    if empty := [q for q in qrels if not queries[q].strip()]:
        raise InputError(f"queries.jsonl: query '{empty[0]}' has an empty text",
                         hint="Give every judged query a text")
    doc_ids: list[str] = []
    doc_texts: list[str] = []
    skipped: list[str] = []
    for row in corpus:
        text = document_text(row["title"], row["text"])
        if text:
            doc_ids.append(row["_id"])
            doc_texts.append(text)
        else:
            skipped.append(row["_id"])
    if skipped:
        logger.warning("eval set: %d documents with neither title nor text are skipped "
                       "(first: %s)", len(skipped), skipped[0])
    if not doc_ids:
        raise InputError(f"'{root / 'corpus.jsonl'}' has no document with text",
                         hint="Give documents a title or a text")
    known = set(doc_ids)
    unknown = {d for docs in qrels.values() for d in docs if d not in known}
    if unknown:
        logger.warning("eval set: the qrels judge %d documents that the corpus lacks; they "
                       "count as relevant but can never be retrieved", len(unknown))
    order = [q for q in queries if q in qrels]  # queries.jsonl order, as BEIR
    return EvalSet(path=root, split=split, doc_ids=tuple(doc_ids), doc_texts=tuple(doc_texts),
                   query_ids=tuple(order), query_texts=tuple(queries[q] for q in order),
                   qrels={q: qrels[q] for q in order}, skipped_documents=tuple(skipped))


# --- the tiny built-in set --------------------------------------------------------------------

_TINY_DOCS = 20
_TINY_TITLES = {3: "France", 4: "Photosynthesis", 5: "Cell biology", 10: "SQL"}
_TINY_QUERIES: tuple[tuple[str, str, dict[int, int]], ...] = (
    ("q1", "What is the capital city of France?", {3: 1}),
    ("q2", "how do plants turn sunlight into energy", {4: 1}),
    ("q3", "which organelle is the powerhouse of the cell", {5: 1}),
    ("q4", "python function that adds two numbers", {8: 2, 11: 0}),
    ("q5", "a fox jumping over a lazy dog", {0: 2, 12: 1, 13: 1, 14: 1, 15: 1}),
    ("q6", "SQL query that counts users by name", {10: 1}),
    ("q7", "how are texts turned into vectors for search", {1: 2, 2: 1}),
    ("q8", "the capital of Japan", {17: 1}),
)
_TINY_DEV = ("q1", "q5", "q7")


def write_tiny_eval_set(directory: str | os.PathLike[str]) -> Path:
    """Write a tiny BEIR set (20 documents of the built-in corpus, 8 queries, graded qrels in
    ``test`` and a 3-query ``dev`` split) for tests and smoke runs.

    Its documents are also the exporter's calibration texts, so it checks the plumbing and the
    metrics, not generalization; bring a real BEIR set to measure retrieval quality.

    Args:
        directory: where to write (created; existing files of the set are replaced).

    Returns:
        ``directory`` as a Path.
    """
    from qwen3emb.convert._corpus import CORPUS

    root = Path(directory)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i:02d}", "title": _TINY_TITLES.get(i, ""), "text": text.strip()}
            for i, text in enumerate(CORPUS[:_TINY_DOCS])]
    queries = [{"_id": qid, "text": text} for qid, text, _ in _TINY_QUERIES]
    for name, rows in (("corpus.jsonl", docs), ("queries.jsonl", queries)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                 encoding="utf-8")
    for split, keep in (("test", None), ("dev", _TINY_DEV)):
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\td{doc:02d}\t{score}" for qid, _, judged in _TINY_QUERIES
                  if keep is None or qid in keep for doc, score in judged.items()]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
