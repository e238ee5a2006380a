"""Where a corpus job runs: the current Ray session, a cluster, or a local Ray tied to us.

With no address (and no ``RAY_ADDRESS``) the job starts a local Ray on this machine's cores.
That Ray must not outlive the driver, however the driver ends: ``ray.init`` ties the head's GCS
and raylet to it, and :mod:`qwen3emb.corpus.reaper` ends the helpers that would otherwise linger
after a SIGKILL.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qwen3emb.errors import InputError

logger = logging.getLogger(__name__)


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None, verbose: bool = False
                ) -> Iterator[str]:
    """Connect to Ray for the duration of a job; yields where it runs, in words.

    Args:
        address: a Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``); default
            ``RAY_ADDRESS``, else a new local Ray. A session this process already opened
            (``ray.init`` before the call) is used as it is and left open.
        num_cpus: CPUs of a local Ray (default: this machine's).
        object_store_memory: bytes of a local Ray's object store (default: Ray's choice).
        verbose: let Ray log at INFO and forward its workers' output.
    """
    import ray

    if ray.is_initialized():
        yield "the current Ray session"
        return
    level = logging.INFO if verbose else logging.ERROR
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
        try:
            yield f"the Ray cluster at {address}"
        finally:
            ray.shutdown()
        return
    reaper = _start_reaper()
    cpus = num_cpus or local_cpus()
    try:
        before = _children()
        # "local": a new Ray even when another one runs on this machine (ray.init() would
        # join that one).
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 object_store_memory=object_store_memory, logging_level=level,
                 log_to_driver=verbose)
        if reaper is not None and reaper.stdin is not None:
            roots = _children() - before - {reaper.pid}
            reaper.stdin.write(("".join(f"{pid} " for pid in sorted(roots)) + "\n").encode())
            reaper.stdin.flush()
        yield f"a local Ray with {cpus} CPUs"
    finally:
        try:
            ray.shutdown()
        finally:
            _stop_reaper(reaper)


def _children() -> set[int]:
    """Pids of this process's children (empty where there is no ``/proc``)."""
    from qwen3emb.corpus.reaper import process_table

    if not os.path.isdir("/proc"):  # pragma: no cover - Linux only
        return set()
    me = os.getpid()
    return {pid for pid, (parent, _) in process_table().items() if parent == me}


def _start_reaper() -> subprocess.Popen[bytes] | None:
    """Start :mod:`qwen3emb.corpus.reaper` in its own session (Ctrl-C does not reach it)."""
    if not os.path.isdir("/proc"):  # pragma: no cover - Linux only
        return None
    code = "import sys; from qwen3emb.corpus.reaper import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True)


def _stop_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """Close the reaper's pipe (it then ends any straggler) and wait for it."""
    if reaper is None:
        return
    if reaper.stdin is not None:
        reaper.stdin.close()
    try:
        reaper.wait(timeout=60)
    except subprocess.TimeoutExpired:  # pragma: no cover - it gives up after 20 s itself
        reaper.kill()


def plan_resources(actors: int | None, threads: int | None, *, local: bool
                   ) -> tuple[int, int, int]:
    """Actors and onnxruntime threads per actor for the connected Ray; also its CPU count.

    Defaults: up to 4 threads per actor and as many actors as the CPUs allow, so actors hold
    every CPU; reading runs in zero-CPU tasks (I/O bound) and writing in the driver.

    Raises:
        InputError: on a local Ray, more CPUs asked for than it has (actors would never start).
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    threads = threads or max(1, min(4, cpus))
    actors = actors or max(1, cpus // threads)
    if threads < 1 or actors < 1:
        raise InputError("--actors and --threads-per-actor must be at least 1")
    if actors * threads > cpus:
        message = (f"{actors} actors x {threads} threads need {actors * threads} CPUs and Ray "
                   f"has {cpus}")
        if local:
            raise InputError(message, hint="Lower --actors or --threads-per-actor")
        logger.warning("%s: some actors wait until the cluster scales up", message)
    return actors, threads, cpus


def describe_versions() -> dict[str, Any]:
    """Versions of the libraries that shape the output, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {}
    for name in ("ray", "pyarrow", "onnxruntime", "tokenizers", "numpy", "fsspec", "Pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
