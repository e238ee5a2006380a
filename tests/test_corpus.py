"""embed-corpus on Ray Data: vectors, formats, bad rows, and exactly once after crashes.

Every test that runs a job shares one Ray session: a ``ray.cluster_utils.Cluster`` head with
2 CPUs, no dashboard and a 200 MB object store (the node-loss test adds a second node to it).
The SIGKILL test runs the CLI in a subprocess with its own local Ray, as a user would. Vectors are
checked against ``TextEmbedder.encode`` / ``VLEmbedder`` on each unit's rows: a unit is embedded
exactly as ``encode`` embeds that list, so the two agree bit for bit. No Ray process may outlive
the session fixture.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.corpus import CorpusOptions, RayOptions, embed_corpus
from qwen3emb.corpus.reaper import process_table, subtrees

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()
runner = CliRunner()


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def my_tree() -> dict[int, int]:
    """This process's live descendants (pid → start time), itself excluded."""
    table = process_table()
    tree = subtrees({os.getpid(): table[os.getpid()][1]}, table)
    tree.pop(os.getpid())
    return tree


def wait_gone(known: dict[int, int], timeout: float = 30.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while (alive := subtrees(known, process_table())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def ray_cluster():
    """The shared Ray session; afterwards, checks that none of its processes survived."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 << 20})
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    yield cluster
    started = my_tree()
    ray.shutdown()
    cluster.shutdown()
    left = {pid: cmdline(pid) for pid in wait_gone(started)}
    assert not left, f"Ray processes outlived the session: {left}"


def read_out(out: Path) -> tuple[pa.Table, list[dict[str, Any]], dict[str, Any]]:
    """The committed rows, the error rows and the manifest of an OUT directory."""
    table = pq.read_table(out)
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    return table, errors, json.loads((out / "_manifest.json").read_text())


def assert_exactly_once(out: Path, expected_ids: set[str]) -> tuple[pa.Table, list[dict]]:
    table, errors, manifest = read_out(out)
    ids = table["id"].to_pylist() + [e["id"] for e in errors]
    assert len(ids) == len(set(ids)), "an id is in OUT twice"
    assert set(ids) == expected_ids
    assert manifest["status"] == "complete"
    assert manifest["rows"]["embedded"] == table.num_rows
    assert manifest["rows"]["skipped"] == len(errors)
    return table, errors


def assert_parts_match(out: Path, texts: dict[str, str], embed: Callable[[list[str]], Any]
                       ) -> None:
    """Every part (one unit) equals ``embed`` on its rows' texts, bit for bit."""
    parts = sorted(out.glob("part-*.parquet"))
    assert parts
    for part in parts:
        table = pq.read_table(part)
        expected = embed([texts[i] for i in table["id"].to_pylist()])
        got = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, expected, err_msg=part.name)


# --- jobs on the shared Ray session ---------------------------------------------------------

def write_mixed_corpus(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Parquet, JSONL, CSV and text files with good and bad rows.

    Returns:
        (id → text of every row that can be embedded, id → error code of every other row).
    """
    root.mkdir()
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    texts = docs(250, seed=1)
    texts[7] = " ".join(WORDS) * 60  # longer than the bundle's max_length: truncated
    ids = [f"p{i}" for i in range(250)]
    texts_col: list[str | None] = list(texts)
    texts_col[11] = None
    pq.write_table(pa.table({"id": ids, "text": texts_col}), root / "a.parquet",
                   row_group_size=100)
    good.update({i: t for i, t in zip(ids, texts) if i != "p11"})
    bad["p11"] = "missing"

    lines = [json.dumps({"id": f"j{i}", "text": t}) for i, t in enumerate(docs(150, seed=2))]
    good.update({f"j{i}": t for i, t in enumerate(docs(150, seed=2))})
    lines += [json.dumps({"id": "j-int", "text": 7}), json.dumps({"id": "j-empty", "text": ""}),
              json.dumps({"id": "j-none"}), "{broken", "[1, 2]", ""]
    bad.update({"j-int": "not_string", "j-empty": "empty", "j-none": "missing"})
    bad[f"{root}/b.jsonl:154"] = "unreadable"
    bad[f"{root}/b.jsonl:155"] = "unreadable"
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")

    with open(root / "c.csv", "w", newline="") as handle:
        handle.write("id,text\n")
        for i, t in enumerate(docs(120, seed=3)):
            value = f'{t}, "quoted"\nsecond line'
            handle.write(f'c{i},"{value.replace(chr(34), chr(34) * 2)}"\n')
            good[f"c{i}"] = value
        handle.write("c-short\n")
    bad[f"{root}/c.csv:121"] = "unreadable"

    lines = docs(130, seed=4)
    lines[60] = ""
    (root / "d.txt").write_text("\n".join(lines) + "\n")
    for n, line in enumerate(lines, start=1):
        if line:
            good[f"{root}/d.txt:{n}"] = line
        else:
            bad[f"{root}/d.txt:{n}"] = "empty"

    # A Parquet file whose footer reads but whose second row group is corrupt.
    texts = docs(300, seed=5)
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(300)], "text": texts}),
                   root / "e.parquet", row_group_size=100)
    chunk = pq.ParquetFile(root / "e.parquet").metadata.row_group(1).column(1)
    data = bytearray((root / "e.parquet").read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + 64] = b"\xab" * 64
    (root / "e.parquet").write_bytes(bytes(data))
    for i, t in enumerate(texts):
        if 100 <= i < 200:
            bad[f"x{i}"] = "unreadable"
        else:
            good[f"x{i}"] = t
    return good, bad


def test_every_format_embeds_each_id_once_like_encode(ray_cluster, tiny_bundle: Path,
                                                     tmp_path: Path) -> None:
    from qwen3emb.runtime import TextEmbedder

    good, bad = write_mixed_corpus(tmp_path / "data")
    out = tmp_path / "out"
    summary = embed_corpus(tiny_bundle, [str(tmp_path / "data")], out,
                           options=CorpusOptions(unit_rows=64, batch_size=16),
                           ray_options=RayOptions(actors=2, threads_per_actor=1))
    table, errors = assert_exactly_once(out, set(good) | set(bad))
    assert {e["id"]: e["code"] for e in errors} == bad
    assert all(e["reason"] and e["file"].startswith(str(tmp_path)) for e in errors)
    assert summary.rows == len(good) and summary.errors == len(bad)
    codes = {c: list(bad.values()).count(c) for c in set(bad.values())}
    assert summary.errors_by_code == codes
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)

    embedder = TextEmbedder(tiny_bundle)
    assert_parts_match(out, good, lambda t: embedder.encode(t, batch_size=16))
    ids, cut = embedder.tokenize_with_truncation([good[i] for i in table["id"].to_pylist()])
    assert table["n_tokens"].to_pylist() == [len(x) for x in ids]
    assert table["truncated"].to_pylist() == cut and sum(cut) == 1

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["skipped_by_reason"] == dict(sorted(codes.items()))
    assert manifest["bundle"]["sha256"] == manifest["job"]["bundle_sha256"]
    assert manifest["embedding"] == {"dims": 64, "dtype": "float32", "precision": "fp32",
                                     "query": False, "instruction": None}
    assert manifest["libraries"]["ray"] and manifest["tool"]["name"] == "qwen3emb-export"
    assert not (out / "_tmp").exists()


def test_cli_queries_float16_dimensions_and_resume_rules(ray_cluster, tiny_bundle: Path,
                                                        tmp_path: Path) -> None:
    from qwen3emb.runtime import TextEmbedder

    texts = docs(40, seed=6)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    out = tmp_path / "out"
    args = ["embed-corpus", str(tiny_bundle), str(data), "-o", str(out), "--query",
            "--instruction", "Find the matching passage", "--dimensions", "32", "--float16",
            "--batch-size", "8"]
    result = runner.invoke(create_app(), args)
    assert result.exit_code == 0, result.output
    assert "embedded 40 rows" in result.output and "units:   1 of 1 this run" in result.output
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    expected = TextEmbedder(tiny_bundle).encode_queries(
        texts, "Find the matching passage", dimensions=32, batch_size=8).astype(np.float16)
    got = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, expected)

    again = runner.invoke(create_app(), args)
    assert again.exit_code == 2 and "Pass --resume" in again.output
    resumed = runner.invoke(create_app(), [*args, "--resume"])
    assert resumed.exit_code == 0 and "0 of 1 this run (1 committed before)" in resumed.output
    other = runner.invoke(create_app(), [*args[:-2], "--batch-size", "4", "--resume"])
    assert other.exit_code == 2 and "different options" in other.output
    assert pq.read_table(out).equals(table)


def ray_workers(name: str) -> list[int]:
    return [pid for pid in my_tree() if cmdline(pid).startswith(f"ray::{name}")]


def run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = embed_corpus(**kwargs)
        except BaseException as e:  # re-raised by the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def wait_for_commits(out: Path, n: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(os.listdir(out / "_done")) if (out / "_done").is_dir() else 0
        if done >= n:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} units committed after {timeout} s")


def text_corpus(path: Path, n: int, seed: int) -> dict[str, str]:
    texts = docs(n, seed=seed)
    path.write_text("\n".join(texts) + "\n")
    return {f"{path}:{i}": t for i, t in enumerate(texts, start=1)}


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(ray_cluster, tiny_bundle: Path,
                                                                tmp_path: Path) -> None:
    from qwen3emb.runtime import TextEmbedder

    good = text_corpus(tmp_path / "docs.txt", 1500, seed=7)
    out = tmp_path / "out"
    thread, result = run_in_thread(
        bundle=tiny_bundle, inputs=[str(tmp_path / "docs.txt")], out=out,
        options=CorpusOptions(unit_rows=50, batch_size=16),
        ray_options=RayOptions(actors=2, threads_per_actor=1))
    wait_for_commits(out, 1)
    deadline = time.monotonic() + 60
    while not (busy := ray_workers("MapWorker(MapBatches(EmbedActor)).submit")):
        assert time.monotonic() < deadline and thread.is_alive(), "no busy actor to kill"
        time.sleep(0.02)
    os.kill(busy[0], signal.SIGKILL)
    committed_at_kill = len(os.listdir(out / "_done"))
    thread.join(240)
    assert not thread.is_alive(), "the job did not finish after a worker died"
    if "error" in result:
        raise result["error"]
    assert committed_at_kill < 30
    assert result["summary"].rows == 1500
    assert_exactly_once(out, set(good))
    embedder = TextEmbedder(tiny_bundle)
    assert_parts_match(out, good, lambda t: embedder.encode(t, batch_size=16))


def test_driver_sigkilled_then_resume_is_exactly_once(ray_cluster, tiny_bundle: Path,
                                                      tmp_path: Path) -> None:
    from qwen3emb.runtime import TextEmbedder

    good = text_corpus(tmp_path / "docs.txt", 2000, seed=8)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", "from qwen3emb.cli import main; main()", "embed-corpus",
         str(tiny_bundle), str(tmp_path / "docs.txt"), "-o", str(out), "--unit-rows", "50",
         "--batch-size", "16", "--threads-per-actor", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree: dict[int, int] = {}
    names: set[str] = set()
    deadline = time.monotonic() + 180
    while not ((out / "_done").is_dir() and os.listdir(out / "_done")):
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no unit committed in 180 s"
        table = process_table()
        tree.update(subtrees({proc.pid: table[proc.pid][1]}, table))
        names.update(cmdline(pid) for pid in tree)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert any("/raylet " in name for name in names), "the CLI did not start its own Ray"
    left = {pid: cmdline(pid) for pid in wait_gone(tree)}
    assert not left, f"Ray processes outlived the killed driver: {left}"
    committed = len(os.listdir(out / "_done"))
    assert 0 < committed < 40
    assert json.loads((out / "_manifest.json").read_text())["status"] == "running"

    summary = embed_corpus(tiny_bundle, [str(tmp_path / "docs.txt")], out, resume=True,
                           options=CorpusOptions(unit_rows=50, batch_size=16),
                           ray_options=RayOptions(actors=2, threads_per_actor=1))
    assert summary.units == 40 and summary.units_now == 40 - committed
    assert_exactly_once(out, set(good))
    embedder = TextEmbedder(tiny_bundle)
    assert_parts_match(out, good, lambda t: embedder.encode(t, batch_size=16))


def test_a_node_removed_mid_run_loses_and_duplicates_nothing(ray_cluster, tiny_bundle: Path,
                                                             tmp_path: Path) -> None:
    import ray

    from qwen3emb.runtime import TextEmbedder

    node = ray_cluster.add_node(num_cpus=2, object_store_memory=100 << 20)
    ray_cluster.wait_for_nodes()
    good = text_corpus(tmp_path / "docs.txt", 1500, seed=9)
    out = tmp_path / "out"
    thread, result = run_in_thread(
        bundle=tiny_bundle, inputs=[str(tmp_path / "docs.txt")], out=out,
        options=CorpusOptions(unit_rows=50, batch_size=16),
        ray_options=RayOptions(actors=3, threads_per_actor=1))
    wait_for_commits(out, 1)
    # 3 one-CPU actors and 2 CPUs on the head: once 3 CPUs are taken, one actor is on the node.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) > 1:
        assert time.monotonic() < deadline, "the third actor never started"
        time.sleep(0.05)
    ray_cluster.remove_node(node, allow_graceful=False)
    committed_at_removal = len(os.listdir(out / "_done"))
    thread.join(300)
    assert not thread.is_alive(), "the job did not finish after losing a node"
    if "error" in result:
        raise result["error"]
    assert committed_at_removal < 30
    assert_exactly_once(out, set(good))
    embedder = TextEmbedder(tiny_bundle)
    assert_parts_match(out, good, lambda t: embedder.encode(t, batch_size=16))


def test_vl_image_column_of_paths_and_bytes(ray_cluster, vl_bundle: Path, tmp_path: Path
                                            ) -> None:
    from qwen3emb.runtime import VLEmbedder
    from qwen3emb.validate.vl_probes import synthetic_image

    def png(width: int, height: int, seed: int) -> bytes:
        buffer = io.BytesIO()
        synthetic_image(width, height, seed=seed).save(buffer, format="PNG")
        return buffer.getvalue()

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(64, 48, 1))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not an image")
    rows = [("path-text", "a photo", "img/a.png"), ("path-only", "", "img/a.png"),
            ("undecodable", "x", "img/broken.png"), ("absent", "y", "img/none.png"),
            ("text-only", "just words", "")]
    with open(tmp_path / "items.csv", "w", newline="") as handle:
        handle.write("id,text,image\n" + "".join(f"{i},{t},{p}\n" for i, t, p in rows))
    pq.write_table(pa.table({"id": ["bytes-1", "bytes-2"], "text": [None, "two"],
                             "image": [png(32, 32, 2), png(40, 72, 3)]}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    summary = embed_corpus(vl_bundle, [str(tmp_path / "items.csv"), str(tmp_path / "b.parquet")],
                           out, options=CorpusOptions(image_column="image", batch_size=4),
                           ray_options=RayOptions(actors=1, threads_per_actor=2))
    _, errors = assert_exactly_once(out, {r[0] for r in rows} | {"bytes-1", "bytes-2"})
    assert {e["id"]: e["code"] for e in errors} == {"undecodable": "bad_image",
                                                   "absent": "unreadable"}
    assert "none.png" in next(e["reason"] for e in errors if e["id"] == "absent")
    assert summary.rows == 5

    embedder = VLEmbedder(vl_bundle)
    image_a = str(tmp_path / "img" / "a.png")
    items = {"path-text": {"text": "a photo", "image": image_a}, "path-only": {"image": image_a},
             "undecodable": {"text": "x", "image": str(tmp_path / "img" / "broken.png")},
             "text-only": {"text": "just words"}}
    csv_part = pq.read_table(next(out.glob("part-000000-*.parquet")))
    expected, failed = embedder.encode_with_errors(
        [items[i] for i in ["path-text", "path-only", "undecodable", "text-only"]], batch_size=4)
    assert list(failed) == [2] and csv_part["id"].to_pylist() == [
        "path-text", "path-only", "text-only"]
    np.testing.assert_array_equal(np.stack(csv_part["embedding"].to_numpy(
        zero_copy_only=False)), expected[[0, 1, 3]])
    bytes_part = pq.read_table(next(out.glob("part-000001-*.parquet")))
    np.testing.assert_array_equal(
        np.stack(bytes_part["embedding"].to_numpy(zero_copy_only=False)),
        embedder.encode([{"image": png(32, 32, 2)}, {"text": "two", "image": png(40, 72, 3)}],
                        batch_size=4))
