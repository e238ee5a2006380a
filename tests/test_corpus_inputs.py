"""embed-corpus without Ray: units, up-front input checks, error reporting, no torch.

The jobs themselves are tested in tests/test_corpus.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from qwen3emb.cli import create_app

runner = CliRunner()


def test_csv_units_cut_between_records_not_inside_quoted_newlines(tmp_path: Path) -> None:
    from qwen3emb.corpus.inputs import Columns, check_inputs, discover_inputs
    from qwen3emb.corpus.plan import plan_units
    from qwen3emb.corpus.read import read_unit

    path = tmp_path / "q.csv"
    path.write_text('id,text\n1,"a\nb"\n2,"say ""hi"", then\n\nleave"\n3,plain\n4,"x,y"')
    files = discover_inputs([str(tmp_path)])
    units = plan_units(files, check_inputs(files, Columns()), unit_rows=2, salt="s")
    assert [(u.first, u.rows) for u in units] == [(1, 2), (3, 2)]
    rows = [r for u in units for r in read_unit(u, Columns())]
    assert [(r.id, r.text) for r in rows] == [
        ("1", "a\nb"), ("2", 'say "hi", then\n\nleave'), ("3", "plain"), ("4", "x,y")]
    again = plan_units(files, check_inputs(files, Columns()), unit_rows=2, salt="s")
    other = plan_units(files, check_inputs(files, Columns()), unit_rows=2, salt="t")
    assert [u.key for u in again] == [u.key for u in units]
    assert not {u.key for u in other} & {u.key for u in units}


def test_unreadable_inputs_fail_before_any_work(tiny_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), no_text)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    cases = [(broken, "broken.parquet' is not a readable Parquet file"),
             (no_text, "no_text.parquet' has no text column 'text' (columns: id, body)"),
             (numbers, "column 'text' of '"),
             (tmp_path / "missing.jsonl", "missing.jsonl' does not exist")]
    for path, message in cases:
        out = tmp_path / f"out-{path.stem}"
        result = runner.invoke(create_app(), ["embed-corpus", str(tiny_bundle), str(path),
                                              "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()


def test_engine_failures_are_reported_by_their_cause() -> None:
    from qwen3emb.corpus.job import failure_cause
    from qwen3emb.errors import BundleError

    remote = RuntimeError("The actor died.\nTraceback (most recent call last):\n  File \"x\"\n"
                          "qwen3emb.errors.BundleError: the bundle at 'b' is not the one\n")
    try:
        raise remote from RuntimeError("")
    except RuntimeError as e:
        assert failure_cause(e) == "qwen3emb.errors.BundleError: the bundle at 'b' is not the one"
    ours = BundleError("bad bundle")
    try:
        raise RuntimeError("wrapped") from ours
    except RuntimeError as e:
        assert failure_cause(e) is ours


def test_corpus_package_imports_without_torch(run_without_torch) -> None:
    result = run_without_torch("""
        import sys
        import qwen3emb.corpus, qwen3emb.corpus.actor, qwen3emb.corpus.read
        import qwen3emb.cli.corpus
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
