"""One wgx interface daemon: the engine wired to a TUN, UDP sockets and the UAPI.

`Device.run()` is a single-threaded poll loop. Each wakeup drains a bounded
batch from every ready source, feeds the engine, then flushes the engine's
outputs, so one syscall-heavy source cannot starve the others. The loop ends
on SIGINT/SIGTERM, when the TUN device is deleted, or when the UAPI socket
file is removed, and always cleans up its socket file.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import select
import signal
import time
from dataclasses import dataclass

from wgx.dataplane import netdev, offload
from wgx.dataplane.tun import Tun, TunGone
from wgx.dataplane.udp import UdpSockets
from wgx.protocol.engine import Engine
from wgx.protocol.timers import Limits

from .fastpath import FastPath, FastPathError, Loader, underlay_for
from .netconf import NetConf, NetConfError
from .uapi import SOCKET_DIR, UapiServer

log = logging.getLogger("wgx.device")

BATCH = 128
TUN_DEFAULT_TXQUEUELEN = 500  # the tun driver's
# The TUN queue is the only buffer in front of a worker, so it gets the depth that
# wireguard-go keeps behind its 500-packet TUN queue (its staged, outbound and
# encryption queues hold 128 + 1024 + 1024 packets): on 2 busy CPUs a worker can
# wait 15-25 ms for its CPU, which is 1000-1900 packets at 75k packets/s.
TUN_TXQUEUELEN = 2048
VNET_BYTES = 8 * 65536  # bytes per wakeup when a read may be a 64 KB TSO super-packet
HOUSEKEEPING_INTERVAL = 0.5


DATAPLANES = ("auto", "xdp", "socket")


@dataclass
class DeviceOptions:
    """dataplane: auto (XDP on the underlay of the endpoints if possible), xdp, socket.

    xdp_iface pins the underlay interface (else it is the route to the first
    known endpoint); workers: how many (default one per RX queue, at most the
    core count); xdp_mode: auto (native, else generic), native or generic.
    """

    dataplane: str = "auto"
    uapi_dir: str = SOCKET_DIR
    limits: Limits | None = None
    xdp_iface: str | None = None
    workers: int | None = None
    xdp_mode: str = "auto"
    tun_offload: bool = True
    worker_fault: str | None = None  # tests only: "rx" or "tx" crashes every batch

    @classmethod
    def from_env(cls, env: dict[str, str]) -> DeviceOptions:
        """Options from WGX_* variables; ValueError names a malformed one.

        WGX_TEST_REKEY_AFTER_TIME (seconds) and WGX_TEST_REKEY_AFTER_MESSAGES shrink
        the rekey limits for soak tests only; WGX_TEST_WORKER_FAULT=rx|tx makes every
        worker crash on its first RX or TX batch, for the crash-loop tests only. A
        deployment never sets them.
        """
        workers = env.get("WGX_WORKERS")
        if workers is not None and not (workers.isdigit() and int(workers) > 0):
            raise ValueError(f"WGX_WORKERS={workers!r}: expected a positive integer")
        fault = env.get("WGX_TEST_WORKER_FAULT") or None
        if fault not in (None, "rx", "tx"):
            raise ValueError(f"WGX_TEST_WORKER_FAULT={fault!r}: expected rx or tx")
        return cls(dataplane=env.get("WGX_DATAPLANE", "auto"),
                   xdp_iface=env.get("WGX_XDP_IFACE") or None,
                   workers=int(workers) if workers else None,
                   xdp_mode=env.get("WGX_XDP_MODE", "auto"),
                   tun_offload=env.get("WGX_TUN_OFFLOAD", "1") != "0",
                   worker_fault=fault,
                   limits=_test_limits(env))


def _test_limits(env: dict[str, str]) -> Limits | None:
    """Shrunk rekey limits from WGX_TEST_REKEY_AFTER_{TIME,MESSAGES}, or None."""
    t, m = env.get("WGX_TEST_REKEY_AFTER_TIME"), env.get("WGX_TEST_REKEY_AFTER_MESSAGES")
    if t is None and m is None:
        return None
    limits = Limits()
    if t is not None:
        try:
            seconds = float(t)
        except ValueError:
            seconds = -1.0
        if not 1.0 <= seconds <= limits.rekey_after_time:
            raise ValueError(f"WGX_TEST_REKEY_AFTER_TIME={t!r}: expected seconds, 1 to "
                             f"{limits.rekey_after_time:g}")
        limits.rekey_after_time = seconds
    if m is not None:
        if not (m.isdigit() and 1000 <= int(m) <= limits.rekey_after_messages):
            raise ValueError(f"WGX_TEST_REKEY_AFTER_MESSAGES={m!r}: expected an integer, "
                             f"1000 to {limits.rekey_after_messages}")
        limits.rekey_after_messages = int(m)
    return limits


class Device:
    """Owns the resources of one interface; create with `Device.open()`."""

    def __init__(self, name: str, tun: Tun, udp: UdpSockets, uapi: UapiServer,
                 options: DeviceOptions) -> None:
        self.name = name
        self.tun = tun
        self.udp = udp
        self.uapi = uapi
        self.options = options
        self.engine = Engine(limits=options.limits, wall_offset=time.time() - time.monotonic())
        self.engine.listen_port = udp.port
        self.engine.mtu = tun.mtu() or 1420
        self.stop_reason: str | None = None
        self.fastpath: FastPath | None = None
        self.fastpath_error: str | None = None
        self.exit_error: str | None = None  # why the daemon stops with an error, if it does
        self._fastpath_tried: set[str] = set()
        self._loader: Loader | None = None
        self._arena = offload.Arena()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._udp_fds: dict[int, object] = {}

    @classmethod
    def open(cls, name: str, options: DeviceOptions | None = None) -> Device:
        """Create the TUN, bind UDP on a free port and listen on the UAPI socket.

        Everything created so far is released again if a later step fails.
        """
        options = options or DeviceOptions()
        if options.dataplane not in DATAPLANES:
            raise ValueError(f"dataplane {options.dataplane!r}: use one of {', '.join(DATAPLANES)}")
        if options.xdp_mode not in ("auto", "native", "generic"):
            raise ValueError(f"XDP mode {options.xdp_mode!r}: use auto, native or generic")
        tun = Tun.create(name, multi_queue=True, vnet_hdr=options.tun_offload)
        udp = uapi = None
        try:
            if tun.mtu() == 1500:  # fresh TUN: default like wireguard-go
                tun.set_mtu(1420)
            if netdev.get_txqueuelen(tun.name) == TUN_DEFAULT_TXQUEUELEN:
                # 500 packets is ~7 ms at 75k packets/s: shorter than a worker may
                # wait for a CPU (see TUN_TXQUEUELEN).
                netdev.set_txqueuelen(tun.name, TUN_TXQUEUELEN)
            _no_link_local(tun.name)
            udp = UdpSockets(0)
            uapi = UapiServer(tun.name, options.uapi_dir)
        except BaseException:
            if udp is not None:
                udp.close()
            tun.close()
            raise
        return cls(tun.name, tun, udp, uapi, options)

    # ---- DeviceControl for the UAPI

    def now(self) -> float:
        return time.monotonic()

    def set_listen_port(self, port: int) -> None:
        self.udp.bind(port)
        self.engine.listen_port = self.udp.port
        self._register_udp()
        if self.fastpath is not None:
            self.fastpath.set_listen_port(self.udp.port)

    def set_fwmark(self, mark: int) -> None:
        self.udp.set_fwmark(mark)
        self.engine.fwmark = mark

    def extra_stats(self) -> dict[str, object]:
        out: dict[str, object] = {
            "dataplane": "xdp" if self.fastpath else "socket",
            "dataplane_setting": self.options.dataplane,
            "mtu": self.engine.mtu,
            "pid": os.getpid(),
            "under_load": int(self.engine.under_load(time.monotonic())),
        }
        if self.fastpath_error:
            out["fastpath_error"] = self.fastpath_error
        if self.fastpath is not None:
            out.update(self.fastpath.stats())
        return out

    # ---- fast path

    def start_fastpath(self, ifname: str, wait: bool = False) -> None:
        """Try the XDP fast path on `ifname` (compiling in the background unless `wait`)."""
        self._fastpath_tried.add(ifname)
        self._loader = Loader(ifname, self.engine.listen_port, self.options.xdp_mode)
        if wait:
            self._loader.run()
            self._finish_fastpath()
        else:
            self._loader.start()
            log.info("compiling and attaching XDP on %s in the background", ifname)

    def adopt_loader(self, loader: Loader) -> None:
        """Use an XDP program attached before the daemon forked (see wgx-userspace)."""
        self._fastpath_tried.add(loader.ifname)
        self._loader = loader

    def _finish_fastpath(self) -> None:
        loader, self._loader = self._loader, None
        assert loader is not None
        try:
            self.fastpath = FastPath.finish(self.engine, loader, self.name,
                                            workers=self.options.workers,
                                            vnet_hdr=self.tun.vnet_hdr,
                                            fault=self.options.worker_fault)
        except (FastPathError, OSError) as e:
            self.fastpath_error = str(e)
            level = logging.ERROR if self.options.dataplane == "xdp" else logging.INFO
            log.log(level, "fast path not used, socket dataplane stays: %s", e)
            return
        self.fastpath_error = None
        for fd in self.fastpath.report_fds():
            self._poll.register(fd, select.POLLIN)
        # Flows now go to the workers' TUN queues; the daemon's queue stays for liveness.
        self.tun.set_queue_enabled(False)
        self._poll.unregister(self.tun.fd)

    def _maybe_start_fastpath(self) -> None:
        if self._loader is not None:
            if self._loader.done():
                self._finish_fastpath()
            return
        if self.fastpath is not None or self.options.dataplane == "socket":
            return
        ifname = self.options.xdp_iface
        if ifname is None:
            for peer in self.engine.peers.values():
                if peer.endpoint is not None:
                    ifname = underlay_for(peer.endpoint)
                    break
        if ifname is not None and ifname not in self._fastpath_tried:
            self.start_fastpath(ifname)

    def _stop_fastpath(self, reattach: bool = True) -> None:
        fp, self.fastpath = self.fastpath, None
        if fp is None:
            return
        for fd in fp.report_fds():
            with contextlib.suppress(KeyError):
                self._poll.unregister(fd)
        fp.stop()
        if reattach:
            self.tun.set_queue_enabled(True)
            self._poll.register(self.tun.fd, select.POLLIN)

    # ---- loop

    def _register_udp(self) -> None:
        for fd in self._udp_fds:
            self._poll.unregister(fd)
        self._udp_fds = {s.fileno(): s for s in self.udp.sockets()}
        for fd in self._udp_fds:
            self._poll.register(fd, select.POLLIN)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run(self) -> str:
        """Serve until told to stop; returns the reason."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: self.request_stop(signal.Signals(s).name))
        poll = self._poll
        poll.register(self._wake_r, select.POLLIN)
        poll.register(self.tun.fd, select.POLLIN)
        poll.register(self.uapi.listener.fileno(), select.POLLIN)
        self._register_udp()
        engine = self.engine
        next_housekeeping = 0.0
        log.info("interface %s up (udp port %d, dataplane socket)", self.name, self.udp.port)
        try:
            while self.stop_reason is None:
                now = time.monotonic()
                deadline = engine.get_timer()
                wait = HOUSEKEEPING_INTERVAL if deadline is None else deadline - now
                wait = min(max(wait, 0.0), HOUSEKEEPING_INTERVAL)
                ready = poll.poll(wait * 1000.0)
                now = time.monotonic()
                for fd, _ev in ready:
                    if fd == self.tun.fd:
                        self._from_tun(now)
                    elif fd in self._udp_fds:
                        self._from_udp(fd, now)
                    elif fd == self.uapi.listener.fileno():
                        conn = self.uapi.accept()
                        if conn is not None:
                            poll.register(conn.fileno(), select.POLLIN)
                    elif fd in self.uapi.clients:
                        if not self.uapi.on_readable(fd, self, self.extra_stats()):
                            poll.unregister(fd)
                        if self.fastpath is not None:
                            self.fastpath.sync()
                    elif self.fastpath is not None and fd in self.fastpath.pool.reports:
                        self._from_workers(fd, now)
                    elif fd == self._wake_r:
                        os.read(self._wake_r, 64)
                    self._flush()
                deadline = engine.get_timer()
                if deadline is not None and deadline <= now:
                    engine.handle_timer(now)
                    self._flush()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self._housekeeping()
                self._drain_events()
        except TunGone:
            self.stop_reason = "TUN device deleted"
        finally:
            self._stop_fastpath(reattach=False)
        log.info("interface %s shutting down: %s", self.name, self.stop_reason)
        return self.stop_reason or "stopped"

    def _from_tun(self, now: float) -> None:
        engine = self.engine
        raw = self.tun.read_batch(BATCH, VNET_BYTES if self.tun.vnet_hdr else None)
        if self.tun.vnet_hdr:
            for segment in offload.split_gso_batch(raw, engine.mtu, arena=self._arena):
                engine.send_packet(bytes(segment), now)
        else:
            for packet in raw:
                engine.send_packet(packet, now)

    def _from_udp(self, fd: int, now: float) -> None:
        engine = self.engine
        sock = self._udp_fds[fd]
        recv = self.udp.recv
        for _ in range(BATCH):
            got = recv(sock)  # type: ignore[arg-type]
            if got is None:
                break
            engine.receive_datagram(got[0], got[1], now)
        if self.fastpath is not None:
            self.fastpath.set_under_load(engine.under_load(now), now)

    def _flush(self) -> None:
        # Events first: a new keypair must reach the XDP sessions map and the workers
        # before the packet that completes the handshake leaves (its answer follows).
        self._drain_events()
        engine = self.engine
        if engine.datagrams:
            send = self.udp.send
            for data, ep in engine.datagrams:
                send(data, ep)
            engine.datagrams.clear()
        if engine.tun:
            if self.tun.vnet_hdr:
                write = self.tun.write_vnet
                udp = self.tun.uso and len(engine.tun) >= offload.UDP_COALESCE_MIN_BATCH
                for buf in offload.coalesce(engine.tun, udp=udp):
                    write(buf)
            else:
                write = self.tun.write
                for packet in engine.tun:
                    write(packet)
            engine.tun.clear()

    def _from_workers(self, fd: int, now: float) -> None:
        fp = self.fastpath
        assert fp is not None
        before = set(fp.report_fds())
        fp.on_readable(fd, now)
        after = set(fp.report_fds())
        for gone in before - after:
            with contextlib.suppress(KeyError):
                self._poll.unregister(gone)
        if before - after:
            # A worker died. If the TUN device is gone, that is why: stop.
            try:
                self.tun.set_queue_enabled(True)
                self.tun.set_queue_enabled(False)
            except OSError:
                raise TunGone(self.name) from None
        for new in after - before:
            self._poll.register(new, select.POLLIN)
        if fp.failure is not None:
            self._fastpath_failed(fp.failure)

    def _fastpath_failed(self, why: str) -> None:
        """The workers kept crashing: with `xdp` the daemon stops with the reason (exit
        status 1); with `auto` the socket dataplane takes over and `wgx show` says why."""
        if self.options.dataplane == "xdp":
            self.exit_error = f"fast path failed: {why}"
            log.error("%s; stopping (WGX_DATAPLANE=xdp)", self.exit_error)
            self.request_stop(self.exit_error)
            return
        self._stop_fastpath()
        self.fastpath_error = f"fast path stopped, the socket dataplane took over: {why}"
        log.error("%s", self.fastpath_error)

    def _housekeeping(self) -> None:
        if not self.uapi.still_ours():
            self.request_stop("UAPI socket removed")
        self._maybe_start_fastpath()
        if self.fastpath is not None:
            now = time.monotonic()
            self.fastpath.housekeeping(now)
            self.fastpath.kill_stuck_workers(now)
        mtu = self.tun.mtu()
        if mtu is not None:
            self.engine.mtu = mtu
        self.engine.wall_offset = time.time() - time.monotonic()

    def _drain_events(self) -> None:
        """Log protocol events and mirror them into the fast path."""
        events = self.engine.events
        while events:
            kind, obj = events.popleft()
            if self.fastpath is not None:
                self.fastpath.on_event(kind, obj)
            if kind == "handshake_complete":
                log.info("peer %s: handshake complete", _short(obj.public_key))  # type: ignore[attr-defined]
            elif kind == "handshake_gave_up":
                log.info("peer %s: handshake did not complete, giving up",
                         _short(obj.public_key))  # type: ignore[attr-defined]
            elif kind == "endpoint":
                log.debug("peer %s: endpoint now %s", _short(obj.public_key),  # type: ignore[attr-defined]
                          obj.endpoint)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.uapi.close()
        self.udp.close()
        self.tun.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _no_link_local(name: str) -> None:
    """No IPv6 link-local address on our TUN, as kernel WireGuard's wg_open does: the
    kernel would send router solicitations from it into the tunnel, where they match
    no peer. Only while it is down: an interface someone brought up keeps its
    addresses. Best effort: without IPv6 in this namespace there is nothing to stop."""
    try:
        with NetConf() as nc:
            if not nc.link_info(name)["up"]:
                nc.no_ipv6_link_local(name)
    except NetConfError as e:
        log.info("interface %s: IPv6 address generation left as is: %s", name, e)


def _short(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode()[:8] + "…"
