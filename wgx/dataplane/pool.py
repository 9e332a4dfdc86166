"""Starts and stops the worker processes, hands them keys, collects their reports.

The pool keeps the latest state it sent (keypairs, peers, allowed IPs, which
keypair each peer sends with), so a worker that dies is restarted and brought
up to date without the daemon's help. Workers are forked from the daemon, so
they inherit the shared session slots, the XDP map descriptors and nothing
else of interest; all later state goes over one pipe per worker.

Forked workers share the daemon's heap copy-on-write. Before each fork the
daemon's objects are moved out of the collector's reach (`gc.freeze`): a full
collection writes to the header of every object it visits, so without that
the first one in each process copies every page holding one (measured: 15 MB
of a worker's heap made private at once; the three processes' total PSS grew
by 30% over a 30-minute soak). Frozen objects are still freed when their last
reference goes; only cycles among them are never collected.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .sessions import SessionSlots
from .worker import WorkerSpec, worker_main

log = logging.getLogger("wgx.pool")
_ctx = multiprocessing.get_context("fork")
# A pool whose workers died this often within this many seconds is crashing on its
# input, not being killed: restarting it forever would only hide that.
CRASH_LIMIT = 3
CRASH_WINDOW = 10.0
# A running worker applies commands between batches, within milliseconds. One that has
# not acknowledged a keypair removal for this long is stopped or hung: it holds back
# slots (and may hold a slot's lock), so it is killed and restarted.
STUCK_AFTER = 5.0


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], slots: SessionSlots,
                 set_xsk: Callable[[int, int], None]) -> None:
        self.specs = specs
        self.slots = slots
        self.set_xsk = set_xsk
        self.procs: list[Any] = [None] * len(specs)
        self.cmds: list[Connection | None] = [None] * len(specs)
        self.reports: dict[int, tuple[int, Connection]] = {}  # fd -> (worker, conn)
        self.keypairs: dict[int, tuple] = {}
        self.peers: dict[int, tuple] = {}
        self.current: dict[int, tuple] = {}
        self.allowed: tuple = ("allowed", [])
        self.restarts = 0
        self._live_stats: list[dict[str, int]] = [{} for _ in specs]
        self._retired: list[dict[str, int]] = [{} for _ in specs]  # of dead predecessors
        self.ready: set[int] = set()
        self.failures: dict[int, str] = {}  # workers that could not start, and why
        self.crashes: dict[int, str] = {}  # why each worker last died, in one line
        self._crash_reports: dict[int, str] = {}  # what a crashing worker said, until it died
        self._deaths: deque[float] = deque(maxlen=CRASH_LIMIT)
        self.gave_up: str | None = None  # why workers are no longer restarted
        # Keypair removals carry a sync token; a worker acknowledges the greatest it
        # applied. A slot retired with token t is free once every live worker acked t.
        self.sync_token = 0
        self.acked: list[int] = [0] * len(specs)
        self._dead: set[int] = set(range(len(specs)))  # not running: they hold nothing
        self._unsettled: deque[tuple[int, float]] = deque()  # (token, when sent), ascending

    def start(self) -> None:
        for i in range(len(self.specs)):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        cmd_r, cmd_w = _ctx.Pipe(duplex=False)
        rep_r, rep_w = _ctx.Pipe(duplex=False)
        # Kept frozen in the daemon too: collecting them there would copy the pages
        # the workers still share.
        gc.freeze()
        proc = _ctx.Process(target=worker_main, name=f"wgx-worker-{i}", daemon=True,
                            args=(self.specs[i], self.slots, cmd_r, rep_w, self.set_xsk))
        proc.start()
        cmd_r.close()
        rep_w.close()
        self.procs[i] = proc
        self.cmds[i] = cmd_w
        self.acked[i] = self.sync_token  # its snapshot holds no keypair removed before
        self._dead.discard(i)
        self.reports[rep_r.fileno()] = (i, rep_r)
        for msg in self._snapshot():
            cmd_w.send(msg)

    def _snapshot(self) -> list[tuple]:
        return [*self.keypairs.values(), *self.peers.values(), self.allowed,
                *self.current.values()]

    # -- state updates (remembered for restarts, then broadcast)
    def add_keypair(self, msg: tuple) -> None:
        self.keypairs[msg[1]] = msg
        self._broadcast(msg)

    def remove_keypair(self, local_index: int) -> int:
        """Tell the workers to forget a keypair; returns the sync token they will
        acknowledge once they did (see `settled`)."""
        self.keypairs.pop(local_index, None)
        self.sync_token += 1
        self._broadcast(("keypair_gone", local_index, self.sync_token))
        self._unsettled.append((self.sync_token, time.monotonic()))
        return self.sync_token

    def settled(self) -> int:
        """The greatest sync token every running worker has acknowledged."""
        return min((a for i, a in enumerate(self.acked) if i not in self._dead),
                   default=self.sync_token)

    def stuck(self, now: float) -> list[int]:
        """Running workers that have not acknowledged a removal sent STUCK_AFTER s ago."""
        settled = self.settled()
        pending = self._unsettled
        while pending and pending[0][0] <= settled:
            pending.popleft()
        if not pending or now - pending[0][1] < STUCK_AFTER:
            return []
        token = pending[0][0]
        return [i for i, a in enumerate(self.acked) if i not in self._dead and a < token]

    def kill(self, i: int) -> None:
        """SIGKILL worker i (a stopped one too); its death is then handled as any other."""
        proc = self.procs[i]
        if proc is not None and proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    def set_current(self, peer_id: int, local_index: int | None) -> None:
        msg = ("current", peer_id, local_index)
        if self.current.get(peer_id) != msg:
            self.current[peer_id] = msg
            self._broadcast(msg)

    def set_peer(self, peer_id: int, endpoint: tuple[str, int] | None) -> None:
        msg = ("peer", peer_id, endpoint)
        if self.peers.get(peer_id) != msg:
            self.peers[peer_id] = msg
            self._broadcast(msg)

    def remove_peer(self, peer_id: int) -> None:
        self.peers.pop(peer_id, None)
        self.current.pop(peer_id, None)
        self._broadcast(("peer_gone", peer_id))

    def set_allowed(self, entries: list[tuple[str, int]]) -> None:
        msg = ("allowed", entries)
        if msg != self.allowed:
            self.allowed = msg
            self._broadcast(msg)

    def set_listen_port(self, port: int) -> None:
        for spec in self.specs:
            spec.listen_port = port
        self._broadcast(("listen_port", port))

    def _broadcast(self, msg: tuple) -> None:
        for conn in self.cmds:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(msg)

    # -- reports
    def report_fds(self) -> list[int]:
        return list(self.reports)

    def read(self, fd: int) -> list[tuple]:
        """Messages waiting on a report pipe; a closed pipe means the worker died."""
        i, conn = self.reports[fd]
        out: list[tuple] = []
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "report":
                    self._live_stats[i] = msg[5]
                elif msg[0] == "ready":
                    self.ready.add(i)
                elif msg[0] == "failed":
                    self.failures[i] = msg[2]
                elif msg[0] == "crashed":
                    self._crash_reports[i] = msg[2]
                elif msg[0] == "ack":
                    self.acked[i] = max(self.acked[i], msg[2])
                out.append(msg)
        except (EOFError, OSError):
            del self.reports[fd]
            conn.close()
            self._dead.add(i)
            dead, self._live_stats[i] = self._live_stats[i], {}
            for k, v in dead.items():
                self._retired[i][k] = self._retired[i].get(k, 0) + v
            out.append(("died", i))
        return out

    @property
    def stats(self) -> list[dict[str, int]]:
        """Counters per worker slot, including those of workers that died there."""
        out = []
        for live, retired in zip(self._live_stats, self._retired, strict=True):
            merged = dict(retired)
            for k, v in live.items():
                merged[k] = merged.get(k, 0) + v
            out.append(merged)
        return out

    def respawn(self, i: int) -> bool:
        """Replace a dead worker (its XSK slot in the map is taken over by the new one).

        After CRASH_LIMIT deaths within CRASH_WINDOW seconds (of any workers) nothing is
        restarted any more: `gave_up` says why, and False is returned.
        """
        proc = self.procs[i]
        if proc is not None:
            proc.join(timeout=1)
        old = self.cmds[i]
        if old is not None:
            old.close()
            self.cmds[i] = None
        self.ready.discard(i)
        code = None if proc is None else proc.exitcode
        why = self.crashes[i] = self._crash_reports.pop(i, None) or f"exit status {code}"
        now = time.monotonic()
        self._deaths.append(now)
        if len(self._deaths) == CRASH_LIMIT and now - self._deaths[0] <= CRASH_WINDOW:
            self.gave_up = (f"workers died {CRASH_LIMIT} times in "
                            f"{now - self._deaths[0]:.1f} s; worker {i}: {why}")
            log.error("not restarting workers: %s", self.gave_up)
            return False
        self.restarts += 1
        log.warning("worker %d died (%s); restarting", i, why)
        self._spawn(i)
        return True

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.pid]

    def stop(self) -> None:
        self._broadcast(("stop",))
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=2)
                if proc.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.join(timeout=1)
        for _, conn in self.reports.values():
            conn.close()
        for conn in self.cmds:
            if conn is not None:
                conn.close()
        self.reports.clear()
