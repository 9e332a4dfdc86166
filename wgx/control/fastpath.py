"""The XDP/AF_XDP fast path of one interface, as the daemon drives it.

`FastPath.start()` attaches bpf/wgx_xdp.c to the underlay interface, makes
the engine's keypairs shared-memory ones, and forks one worker per RX queue.
From then on the daemon keeps handshakes, timers and the UAPI; `on_event`
mirrors the engine's keypair and peer changes into the workers and the XDP
`sessions` map, and `on_report` feeds the workers' batched reports (traffic,
roaming, key confirmation, packets that need a handshake) back into the
engine. `stop()` stops the workers and detaches the program.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from pyroute2 import IPRoute

from wgx.dataplane.netdev import rx_queues
from wgx.dataplane.pool import STUCK_AFTER, WorkerPool
from wgx.dataplane.sessions import SessionSlots, SharedKeypair, SlotsExhausted, slots_for
from wgx.dataplane.worker import WorkerSpec
from wgx.dataplane.xdp import XdpError, XdpProgram
from wgx.protocol.engine import UNDER_LOAD_HOLD, Engine
from wgx.protocol.peer import Keypair, Peer
from wgx.protocol.ratelimiter import PACKETS_BURSTABLE, PACKETS_PER_SECOND
from wgx.protocol.replay import WINDOW_SIZE

log = logging.getLogger("wgx.fastpath")

READY_TIMEOUT = 10.0
# Under load, initiations from sources that are no configured peer's endpoint share
# this budget in XDP (on top of the per-source limit). A spoofed flood from many
# addresses then costs the daemon at most this many cookie replies per second
# (~7% of a core here) instead of a core, and known peers are never crowded out.
UNKNOWN_INITIATIONS_PER_SECOND = 1000
UNKNOWN_INITIATIONS_BURST = 32


class FastPathError(RuntimeError):
    pass


def underlay_for(endpoint: tuple[str, int]) -> str | None:
    """Name of the interface the kernel routes `endpoint` through, if any."""
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=endpoint[0])[0]
        except Exception:
            return None
        oif = route.get_attr("RTA_OIF")
        return socket.if_indextoname(oif) if oif else None


class Loader:
    """Compiles and attaches the XDP program; `start()` does it in a thread.

    Compiling takes seconds (clang, in a helper process); in a thread the daemon
    keeps serving packets on the socket path meanwhile. Workers are forked only
    after the thread has ended.
    """

    def __init__(self, ifname: str, listen_port: int, xdp_mode: str) -> None:
        self.ifname = ifname
        self.listen_port = listen_port
        self.xdp_mode = xdp_mode
        self.prog: XdpProgram | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="wgx-xdp-load", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def run(self) -> None:
        if self.ifname == "lo":
            self.error = "lo supports neither native XDP nor AF_XDP"
            return
        prog = XdpProgram()
        try:
            prog.cleanup_stale(self.ifname)
            prog.load(self.ifname, self.listen_port, self.xdp_mode)
        except (XdpError, OSError) as e:
            prog.close()
            self.error = f"cannot attach XDP to {self.ifname}: {e}"
            return
        self.prog = prog

    def result(self) -> XdpProgram:
        if self._thread is not None:
            self._thread.join()
        if self.prog is None:
            raise FastPathError(self.error or "XDP program not loaded")
        return self.prog


class FastPath:
    def __init__(self, engine: Engine, ifname: str, prog: XdpProgram, pool: WorkerPool,
                 slots: SessionSlots) -> None:
        self.engine = engine
        self.ifname = ifname
        self.prog = prog
        self.pool = pool
        self.slots = slots
        self._ids: dict[Peer, int] = {}
        self._next_id = 1
        self._last_floor = 0.0
        self._under_load: bool | None = None  # last value written to XDP (None: unknown)
        self._known: frozenset[str] | None = None  # endpoint hosts last written to XDP
        self._shed = 0  # initiations XDP's rate limits had dropped at the last look
        self._shed_until = float("-inf")  # XDP shed initiations recently: stay under load
        self._events_lost = engine.events.lost  # events dropped unseen: time to `sync`

    @classmethod
    def start(cls, engine: Engine, ifname: str, tun_name: str, *, workers: int | None = None,
              xdp_mode: str = "auto", vnet_hdr: bool = False) -> FastPath:
        """Attach XDP on `ifname` and start the workers; raises FastPathError with the reason."""
        loader = Loader(ifname, engine.listen_port, xdp_mode)
        loader.run()
        return cls.finish(engine, loader, tun_name, workers=workers, vnet_hdr=vnet_hdr)

    @classmethod
    def finish(cls, engine: Engine, loader: Loader, tun_name: str, *,
               workers: int | None = None, vnet_hdr: bool = False,
               fault: str | None = None) -> FastPath:
        """Second step, in the daemon's thread: shared slots and worker processes."""
        prog, ifname = loader.result(), loader.ifname
        queues = rx_queues(ifname)
        n = min(workers or queues, queues, os.cpu_count() or 1)
        slots = SessionSlots(limit=slots_for(len(engine.peers)))
        specs = [
            WorkerSpec(i, ifname, i, tun_name, engine.listen_port, engine.mtu,
                       engine.limits.reject_after_time, engine.limits.reject_after_messages,
                       vnet_hdr, fault)
            for i in range(n)
        ]
        pool = WorkerPool(specs, slots, prog.set_xsk)
        fp = cls(engine, ifname, prog, pool, slots)
        engine.keypair_factory = fp._new_keypair
        # XDP applies the engine's per-source policy before the daemon sees a packet.
        prog.set_ratelimit(PACKETS_PER_SECOND, PACKETS_BURSTABLE)
        prog.set_global_ratelimit(UNKNOWN_INITIATIONS_PER_SECOND, UNKNOWN_INITIATIONS_BURST)
        fp.set_under_load(engine.under_load(time.monotonic()), time.monotonic())
        fp._share_existing_keypairs()
        pool.start()
        fp.sync()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(pool.ready) < n and not pool.failures and time.monotonic() < deadline:
            for fd in pool.report_fds():
                pool.read(fd)
            time.sleep(0.01)
        if len(pool.ready) < n:
            why = "; ".join(pool.failures.values()) or "workers did not start in time"
            fp.stop()
            raise FastPathError(f"AF_XDP workers on {ifname}: {why}")
        log.info("fast path on %s: XDP %s, %d worker(s)", ifname, prog.attach_mode, n)
        return fp

    # ------------------------------------------------------------------ state

    def peer_id(self, peer: Peer) -> int:
        pid = self._ids.get(peer)
        if pid is None:
            pid = self._ids[peer] = self._next_id
            self._next_id += 1
        return pid

    def _share_existing_keypairs(self) -> None:
        """Move keypairs made before the fast path started into shared slots."""
        for peer in self.engine.peers.values():
            for attr in ("current", "previous", "next"):
                old: Keypair | None = getattr(peer, attr)
                if old is None or isinstance(old, SharedKeypair):
                    continue
                new = SharedKeypair(self.slots, peer, old.local_index, old.remote_index,
                                    old.initiator, old.created, old.send_key, old.recv_key)
                new.send_counter = old.send_counter
                for i, v in enumerate(old.replay._s):
                    new.replay._s[i] = v
                setattr(peer, attr, new)
                self.engine.indices.add_keypair(new)

    def _new_keypair(self, *args: Any) -> SharedKeypair | None:
        """The engine's keypair factory: None (the handshake is refused, and counted in
        `session_slots_refused`) when no session slot is free within the limit."""
        try:
            return SharedKeypair(self.slots, *args)
        except SlotsExhausted:
            return None

    def _add_keypair(self, kp: Keypair) -> None:
        if not isinstance(kp, SharedKeypair):
            return
        peer = kp.peer
        confirmed = kp is not peer.next
        self.pool.add_keypair(("keypair", kp.local_index, kp.slot, self.peer_id(peer),
                               kp.recv_key, kp.send_key, kp.remote_index, kp.created,
                               kp.initiator, confirmed, kp.tag))
        try:
            self.prog.add_session(kp.local_index, 0, self.peer_id(peer))
        except XdpError as e:
            log.warning("sessions map: %s", e)

    def _remove_keypair(self, kp: Keypair) -> None:
        if isinstance(kp, SharedKeypair):
            self._forget(kp.local_index, kp.slot, kp.tag)
        else:
            self._forget(kp.local_index)

    def _forget(self, local_index: int, slot: int | None = None, tag: int = 0) -> None:
        """The engine destroyed a keypair: the workers and XDP forget it, and its slot is
        freed once every worker acknowledged that (never before: see sessions.py)."""
        token = self.pool.remove_keypair(local_index)
        with contextlib.suppress(XdpError):
            self.prog.remove_session(local_index)
        if slot is not None:
            self.slots.retire(slot, token, tag)
        self.slots.settle(self.pool.settled())

    def sync(self) -> None:
        """Mirror peers, endpoints, allowed IPs and current keypairs into the workers, and
        forget keypairs the engine no longer has (also those whose events were lost)."""
        engine = self.engine
        live = set(engine.peers.values())
        for index, msg in list(self.pool.keypairs.items()):
            if engine.indices.keypair(index) is None:
                self._forget(index, msg[2], msg[10])
        held = {kp.slot for peer in live for kp in peer.keypairs()
                if isinstance(kp, SharedKeypair)}
        for slot in self.slots.live - held:  # never announced: no worker has it
            self.slots.retire(slot, self.pool.sync_token)
        self.slots.limit = slots_for(len(live))
        for peer in [p for p in self._ids if p not in live]:
            self.pool.remove_peer(self._ids.pop(peer))
        allowed: list[tuple[str, int]] = []
        for peer in live:
            pid = self.peer_id(peer)
            self.pool.set_peer(pid, peer.endpoint)
            allowed += [(str(net), pid) for net in engine.allowed.entries(peer)]
            for kp in peer.keypairs():
                if kp.local_index not in self.pool.keypairs:
                    self._add_keypair(kp)
            self.pool.set_current(pid, peer.current.local_index if peer.current else None)
        self.pool.set_allowed(sorted(allowed))
        self._sync_known()

    def _sync_known(self) -> None:
        """Peers' endpoint addresses are the XDP `known` sources (exempt from the global
        initiation budget under load); written only when the set changes."""
        hosts = frozenset(p.endpoint[0] for p in self.engine.peers.values()
                          if p.endpoint is not None)
        if hosts == self._known:
            return
        try:
            self.prog.set_known_sources(sorted(hosts))
        except (XdpError, ValueError, OSError) as e:
            log.warning("XDP known sources: %s", e)
            return
        self._known = hosts

    def on_event(self, kind: str, obj: Any) -> None:
        if kind == "keypair_new":
            self._add_keypair(obj)
            self.pool.set_current(self.peer_id(obj.peer),
                                  obj.peer.current.local_index if obj.peer.current else None)
        elif kind == "keypair_gone":
            self._remove_keypair(obj)
        elif kind in ("current", "endpoint"):
            peer: Peer = obj
            self.pool.set_peer(self.peer_id(peer), peer.endpoint)
            self.pool.set_current(self.peer_id(peer),
                                  peer.current.local_index if peer.current else None)
            if kind == "endpoint":
                self._sync_known()

    # ---------------------------------------------------------------- reports

    def report_fds(self) -> list[int]:
        return self.pool.report_fds()

    def on_readable(self, fd: int, now: float) -> None:
        engine = self.engine
        by_id = {pid: peer for peer, pid in self._ids.items()}
        for msg in self.pool.read(fd):
            kind = msg[0]
            if kind == "report":
                _, _, peers, confirm, stage, _ = msg
                for index in confirm:
                    kp = engine.indices.keypair(index)
                    if kp is not None:
                        engine.confirm_keypair(kp, now)
                for pid, (rx, tx, rx_data, rx_ka, tx_data, src) in peers.items():
                    peer = by_id.get(pid)
                    if peer is not None:
                        engine.note_offloaded(peer, now, rx_bytes=rx, tx_bytes=tx,
                                              rx_data=rx_data, rx_keepalives=rx_ka,
                                              tx_data=tx_data, source=src)
                for packet in stage:
                    engine.send_packet(packet, now)
            elif kind == "died":
                self.pool.respawn(msg[1])
            elif kind == "revoked":  # a worker caught its counter going back
                kp = engine.indices.keypair(msg[2])
                if kp is not None:
                    engine.revoke_keypair(kp)
        self.slots.settle(self.pool.settled())  # acknowledgements, or a worker gone

    @property
    def failure(self) -> str | None:
        """Why the workers are no longer restarted (they kept crashing), or None."""
        return self.pool.gave_up

    def set_listen_port(self, port: int) -> None:
        """Follow a listen-port change: XDP classifies and workers stamp the new port."""
        try:
            self.prog.set_listen_port(port)
        except XdpError as e:
            log.warning("XDP listen port: %s", e)
        self.pool.set_listen_port(port)

    def set_under_load(self, under_load: bool, now: float) -> None:
        """Mirror the engine's under-load state into XDP (its initiation rate limits).

        XDP stays under load while its limits were still dropping initiations
        within the last UNDER_LOAD_HOLD s (see housekeeping): the engine only
        counts what XDP lets through, and releasing XDP because that trickle
        paused would let a flood burst through until the engine re-engages.
        Writes the config map only when the state changes, so the daemon can call
        this after every batch of datagrams.
        """
        under_load = under_load or now < self._shed_until
        if under_load == self._under_load:
            return
        try:
            self.prog.set_under_load(under_load)
        except XdpError as e:
            log.warning("XDP under-load flag: %s", e)
            return
        self._under_load = under_load
        log.info("under load: %s (XDP initiation rate limit %s)", under_load,
                 "on" if under_load else "off")

    def housekeeping(self, now: float) -> None:
        """Raise the XDP counter floors of live sessions (drop far-behind replays early)
        and release the XDP rate limit once the engine is no longer under load."""
        if self._under_load:
            try:
                v = self.prog.verdicts()
                shed = v.get("drop_ratelimit", 0) + v.get("drop_ratelimit_global", 0)
            except XdpError:
                shed = self._shed
            if shed != self._shed:
                self._shed_until = now + UNDER_LOAD_HOLD
            self._shed = shed
        self.set_under_load(self.engine.under_load(now), now)
        if self.engine.events.lost != self._events_lost:  # keypair events may be among them
            self._events_lost = self.engine.events.lost
            self.sync()
        if now - self._last_floor < 1.0:
            return
        self._last_floor = now
        for peer in self.engine.peers.values():
            for kp in peer.keypairs():
                greatest = kp.replay.greatest
                if greatest > WINDOW_SIZE:
                    with contextlib.suppress(XdpError):
                        self.prog.set_session_floor(kp.local_index, greatest - WINDOW_SIZE)

    def kill_stuck_workers(self, now: float) -> None:
        """Kill workers that stopped applying commands (the pool restarts them)."""
        for i in self.pool.stuck(now):
            log.error("worker %d has not applied keypair removals for %g s (stopped or hung): "
                      "killing it; it is restarted", i, STUCK_AFTER)
            self.pool.kill(i)

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {
            "xdp_iface": self.ifname,
            "xdp_attach_mode": self.prog.attach_mode,
            "workers": len(self.pool.specs),
            "worker_restarts": self.pool.restarts,
            **({"worker_last_death": "; ".join(f"worker {i}: {why}" for i, why in
                                               sorted(self.pool.crashes.items()))}
               if self.pool.crashes else {}),
            "worker_pids": ",".join(map(str, self.pool.pids())),
            "xdp_under_load": int(self.prog.under_load),
            "session_slots_live": len(self.slots.live),
            "session_slots_retiring": len(self.slots.retiring),
            "session_slots_limit": self.slots.limit,
            "session_slots_refused": self.slots.refused,
        }
        for name, value in self.prog.verdicts().items():
            out[f"xdp.{name}"] = value
        for i, st in enumerate(self.pool.stats):
            for k, v in st.items():
                out[f"worker{i}.{k}"] = v
        return out

    def stop(self) -> None:
        self.engine.keypair_factory = Keypair  # the socket path needs no shared slots
        self.pool.stop()
        try:
            self.prog.detach()
        finally:
            self.prog.close()
