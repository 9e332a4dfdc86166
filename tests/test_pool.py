"""Worker pool (wgx/dataplane/pool.py): what forked workers share with the daemon."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from wgx.dataplane import pool as pool_mod
from wgx.dataplane.sessions import SessionSlots
from wgx.dataplane.worker import WorkerSpec

BALLAST = 200_000  # one-element lists: tracked by the collector, ~80 bytes each (~16 MB)


def _private_dirty_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty in /proc/self/smaps_rollup")


def _collect_and_measure(spec: WorkerSpec, slots: SessionSlots, cmd: Connection,
                         report: Connection, set_xsk: Any) -> None:
    """Stands in for worker_main: how many KB a full collection makes private."""
    before = _private_dirty_kb()
    gc.collect()
    report.send(("copied_kb", _private_dirty_kb() - before))


@pytest.fixture
def frozen_state() -> Iterator[None]:
    """The pool freezes this (pytest's) process's objects; give them back afterwards."""
    yield
    gc.unfreeze()


def test_full_collection_in_a_worker_does_not_copy_the_daemons_heap(
        monkeypatch: pytest.MonkeyPatch, frozen_state: None) -> None:
    # Regression: a worker's first full collection wrote to every object the
    # daemon had, copying every page of its heap; the soak's memory grew for it.
    monkeypatch.setattr(pool_mod, "worker_main", _collect_and_measure)
    ballast = [[i] for i in range(BALLAST)]
    spec = WorkerSpec(0, "lo", 0, "wgxtest0", 51820, 1420, 180.0, 2**60)
    pool = pool_mod.WorkerPool([spec], SessionSlots(slots=8), lambda q, fd: None)
    pool.start()
    try:
        (_, conn), = pool.reports.values()
        assert conn.poll(30), "the stand-in worker did not report"
        kind, copied_kb = conn.recv()
    finally:
        pool.stop()
    assert kind == "copied_kb"
    ballast_kb = BALLAST * 80 // 1024
    # Unfrozen, the collection copies all of it (~16 MB measured); frozen, only the
    # few pages of objects the child made itself.
    assert copied_kb < ballast_kb // 8, (copied_kb, ballast_kb)
    assert len(ballast) == BALLAST
