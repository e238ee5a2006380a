"""End what a local Ray left behind once the driver that started it is gone.

``ray.init()`` ties the head's GCS and raylet to the driver, but after a SIGKILLed driver some of
Ray's helpers (its dashboard and runtime-env agents, idle workers) live on for a minute or more.
So the driver starts this small process first, with a pipe to its stdin, and after ``ray.init``
writes the pids of the processes Ray started. This process follows their process trees (every
half second, so that it still knows them once the driver's death has reparented them) and, when
the pipe closes (the driver exited, however it died), terminates every process of those trees.
Pids are matched with their start time, so a recycled pid is never signalled. Linux only (it
reads ``/proc``); elsewhere the driver does not start it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

POLL_S = 0.5


def process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, start time in clock ticks), from ``/proc/*/stat``."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def subtrees(roots: dict[int, int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The live processes among ``roots`` (pid → start time) and all their descendants."""
    alive = {pid: start for pid, start in roots.items()
             if pid in table and table[pid][1] == start}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = dict(alive), list(alive)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def terminate(known: dict[int, int], grace: float = 2.0, limit: float = 20.0) -> int:
    """SIGTERM the live processes of ``known`` and their descendants; SIGKILL those still
    there after ``grace`` seconds; repeat until none is left or ``limit`` seconds passed.

    Returns:
        How many processes were signalled.
    """
    signalled: set[int] = set()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        targets = subtrees(known, process_table())
        targets.pop(os.getpid(), None)
        if not targets:
            break
        known.update(targets)
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL if pid in signalled else signal.SIGTERM)
            except OSError:
                pass
            signalled.add(pid)
        until = min(deadline, time.monotonic() + grace)
        while time.monotonic() < until and subtrees(targets, process_table()):
            time.sleep(0.1)
    return len(signalled)


def main() -> int:
    """Read lines of root pids from stdin until EOF, then end those processes' trees."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver
    known: dict[int, int] = {}
    fd = sys.stdin.fileno()
    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                table = process_table()
                known.update({int(w): table[int(w)][1] for w in line.split()
                              if w.isdigit() and int(w) in table})
        if known:
            known.update(subtrees(known, process_table()))
    terminate(known)
    return 0


if __name__ == "__main__":  # pragma: no cover - runs as its own process
    raise SystemExit(main())
