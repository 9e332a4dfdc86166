"""The crypto worker: one process per underlay RX queue, moving packets in batches.

A worker owns one AF_XDP socket (on its queue of the XDP interface) and one
queue of the multi-queue TUN device.

RX: a batch of up to 256 frames from the RX ring; Ethernet/VLAN/IP/UDP/
WireGuard headers are parsed for the batch (with numpy for large batches, with
struct for the rest, which is cheaper below ~200 frames); per packet the
keypair lookup and `decrypt_into` (in place, straight from the UMEM frame)
run in Python; the batch's counters are checked and marked in the
shared replay window in one lock round trip per keypair; the allowed-IPs
source check follows; packets are written to the TUN queue and the frames go
back to the fill ring in one step.

TX: a batch read from the TUN queue; the peer per packet by allowed IPs; one
counter range per peer and batch from the shared slot; the packet is padded
and `encrypt_into` seals it in place in a UMEM frame behind a cached
Ethernet/IPv4/UDP header; the batch goes onto the TX ring with one kick and
completions are reaped. Packets the AF_XDP path cannot send (IPv6 endpoint,
unresolved neighbour, larger than the link MTU) go through a raw UDP socket,
so the kernel resolves, fragments and checksums them.

Keys and peers come from the daemon over a pipe; the worker reports traffic,
roaming sources and key confirmations back in batches (about every 50 ms),
and hands the daemon the packets it cannot send for lack of a session.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgx.protocol.allowedips import AllowedIPs
from wgx.protocol.messages import inner_packet_length, padded_len

from . import netdev, offload
from .nexthop import HEADER_LEN, NextHops
from .sessions import SessionSlots
from .tun import Tun, TunGone
from .xsk import Umem, XskSocket

log = logging.getLogger("wgx.worker")

RX_BATCH = 256
TX_BATCH = 64
TX_VNET_READS = 8  # TSO reads per batch: each may be a 64 KB super-packet (~45 segments)
REPORT_INTERVAL = 0.05
FRAME_SIZE = 2048
FRAME_COUNT = 4096
_NONCE0 = b"\x00\x00\x00\x00"
_ZEROS = bytes(16)
_WG_HDR = struct.Struct("<IIQ")
_IDX_CTR = struct.Struct("<IQ")
# Header parsing: numpy costs ~85 us per call chain whatever the batch size, a
# Python loop ~0.4 us per frame (measured here), so numpy only pays off for
# batches of about 200 frames and more.
NUMPY_PARSE_MIN = 192
IPV6_CHECKSUM = 7
PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class WKeypair:
    local_index: int
    slot: int
    peer_id: int
    receiver: Any
    sender: Any
    remote_index: int
    created: float
    initiator: bool
    confirmed: bool
    window: Any = None


@dataclass(slots=True)
class WPeer:
    peer_id: int
    endpoint: tuple[str, int] | None = None
    current: WKeypair | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_data: int = 0
    rx_keepalive: int = 0
    tx_data: int = 0
    rx_source: tuple[str, int] | None = None
    max_counter: dict[int, int] = field(default_factory=dict)


@dataclass
class WorkerSpec:
    index: int
    ifname: str
    queue: int
    tun_name: str
    listen_port: int
    mtu: int
    reject_after_time: float
    reject_after_messages: int
    vnet_hdr: bool = False


class Worker:
    def __init__(self, spec: WorkerSpec, slots: SessionSlots, cmd: Connection,
                 report: Connection, set_xsk: Any) -> None:
        self.spec = spec
        self.slots = slots
        self.cmd = cmd
        self.report = report
        self.running = True
        self.keypairs: dict[int, WKeypair] = {}
        self.peers: dict[int, WPeer] = {}
        self.allowed: AllowedIPs[int] = AllowedIPs()
        self.stats: dict[str, int] = dict.fromkeys((
            "rx_packets", "rx_batches", "tx_packets", "tx_batches", "tx_raw", "tx_kicks",
            "drop_unknown_index", "drop_bad_tag", "drop_replay", "drop_expired",
            "drop_allowedips_source", "drop_bad_inner", "drop_no_peer", "drop_malformed",
            "staged"), 0)
        self.umem = Umem(FRAME_COUNT, FRAME_SIZE)
        self.xsk = XskSocket(spec.ifname, spec.queue, self.umem)
        self.xsk.refill()
        set_xsk(spec.queue, self.xsk.fileno())
        self.tun = Tun.create(spec.tun_name, multi_queue=True, vnet_hdr=spec.vnet_hdr)
        self._arena = offload.Arena()
        self._rx_out: list[memoryview] = []
        self.nexthops = NextHops(spec.ifname, spec.listen_port)
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.raw6.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
        self.link_mtu = netdev.get_mtu(spec.ifname) or 1500
        self._stage: list[bytes] = []
        self._confirm: list[int] = []

    # ---------------------------------------------------------------- commands

    def apply(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "keypair":
            _, local, slot, peer_id, recv_key, send_key, remote, created, initiator, confirmed = msg
            self.keypairs[local] = WKeypair(
                local, slot, peer_id, ChaCha20Poly1305(recv_key), ChaCha20Poly1305(send_key),
                remote, created, initiator, confirmed, self.slots.window(slot))
        elif kind == "keypair_gone":
            kp = self.keypairs.pop(msg[1], None)
            if kp is not None:
                peer = self.peers.get(kp.peer_id)
                if peer is not None and peer.current is kp:
                    peer.current = None
        elif kind == "current":
            peer = self.peers.setdefault(msg[1], WPeer(msg[1]))
            peer.current = self.keypairs.get(msg[2]) if msg[2] is not None else None
        elif kind == "peer":
            peer = self.peers.setdefault(msg[1], WPeer(msg[1]))
            peer.endpoint = msg[2]
        elif kind == "peer_gone":
            self.peers.pop(msg[1], None)
        elif kind == "allowed":
            table: AllowedIPs[int] = AllowedIPs()
            for net, peer_id in msg[1]:
                table.insert(net, peer_id)
            self.allowed = table
        elif kind == "mtu":
            self.spec.mtu = msg[1]
        elif kind == "listen_port":
            self.spec.listen_port = self.nexthops.listen_port = msg[1]
            self.nexthops.invalidate()
        elif kind == "stop":
            self.running = False

    # --------------------------------------------------------------------- RX

    def rx(self) -> None:
        addrs, lens = self.xsk.rx_peek(RX_BATCH)
        n = len(addrs)
        if not n:
            return
        self.stats["rx_batches"] += 1
        self.stats["rx_packets"] += n
        if n >= NUMPY_PARSE_MIN:
            oks, wgs, ends, idxs, ctrs = _parse_numpy(self.umem.buf, addrs, lens)
        else:
            oks, wgs, ends, idxs, ctrs = _parse_scalar(self.umem._mv, addrs, lens)
        mv = self.umem._mv
        keypairs = self.keypairs
        now = time.monotonic()
        reject_time = self.spec.reject_after_time
        reject_msgs = self.spec.reject_after_messages
        groups: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for i, (o, start, end, index, counter) in enumerate(zip(
                oks, wgs, ends, idxs, ctrs, strict=True)):
            if not o:
                self.stats["drop_malformed"] += 1
                continue
            kp = keypairs.get(index)
            if kp is None:
                self.stats["drop_unknown_index"] += 1
                continue
            if now - kp.created >= reject_time or counter >= reject_msgs:
                self.stats["drop_expired"] += 1
                continue
            if not kp.window.would_accept(counter):
                self.stats["drop_replay"] += 1
                continue
            body = mv[start + 16 : end]
            try:
                kp.receiver.decrypt_into(_NONCE0 + counter.to_bytes(8, "little"), body, None,
                                         body[:-16])
            except InvalidTag:
                self.stats["drop_bad_tag"] += 1
                continue
            groups.setdefault(index, []).append((i, start + 16, end - 16, counter, end - start))
        for index, items in groups.items():
            kp = keypairs[index]
            verdicts = self.slots.accept(kp.slot, kp.window, [it[3] for it in items])
            peer = self.peers.setdefault(kp.peer_id, WPeer(kp.peer_id))
            if not kp.confirmed:
                kp.confirmed = True
                peer.current = kp
                self._confirm.append(index)
            last_ok = -1
            for it, fresh in zip(items, verdicts, strict=True):
                if not fresh:
                    self.stats["drop_replay"] += 1
                    continue
                last_ok = it[0]
                peer.rx_bytes += it[4]
                self._deliver(peer, mv[it[1] : it[2]])
            if last_ok >= 0:
                peer.rx_source = _source(mv, int(addrs[last_ok]))
        if self._rx_out:
            self._write_tun()  # before the frames go back to the kernel
        self.xsk.rx_release(n)
        self.xsk.fill(addrs)

    def _deliver(self, peer: WPeer, plain: memoryview) -> None:
        if not len(plain):
            peer.rx_keepalive += 1
            return
        length = inner_packet_length(plain)
        if not length:
            self.stats["drop_bad_inner"] += 1
            return
        packet = plain[:length]
        peer.rx_data += 1
        if self.allowed.lookup_packet_src(packet) != peer.peer_id:
            self.stats["drop_allowedips_source"] += 1
            return
        self._rx_out.append(packet)

    def _write_tun(self) -> None:
        """Write the batch's packets; with offloads, in-order TCP runs as one super-packet."""
        out, self._rx_out = self._rx_out, []
        if self.tun.vnet_hdr:
            for buf in offload.coalesce(out):
                self.tun.write_vnet(buf)
        else:
            for packet in out:
                self.tun.write(packet)

    # --------------------------------------------------------------------- TX

    def tx(self) -> None:
        if self.tun.vnet_hdr:
            raw = self.tun.read_batch(TX_VNET_READS)
            packets: list[Any] = offload.split_gso_batch(raw, self.spec.mtu, arena=self._arena)
        else:
            packets = self.tun.read_batch(TX_BATCH)
        if not packets:
            return
        self.stats["tx_batches"] += 1
        by_peer: dict[int, list[bytes]] = {}
        lookup = self.allowed.lookup_packet_dst
        for p in packets:
            peer_id = lookup(p)
            if peer_id is None:
                self.stats["drop_no_peer"] += 1
                continue
            by_peer.setdefault(peer_id, []).append(p)
        now = time.monotonic()
        addrs_out: list[int] = []
        lens_out: list[int] = []
        for peer_id, plist in by_peer.items():
            peer = self.peers.get(peer_id)
            kp = peer.current if peer is not None else None
            if (peer is None or kp is None or peer.endpoint is None
                    or now - kp.created >= self.spec.reject_after_time
                    or self.slots.send_counter(kp.slot) + len(plist)
                    >= self.spec.reject_after_messages):
                self._stage.extend(bytes(p) for p in plist)
                continue
            first = self.slots.reserve(kp.slot, len(plist))
            tpl = self.nexthops.header(peer.endpoint, now)
            peer.tx_bytes += self._seal_batch(peer, kp, first, plist, tpl, addrs_out, lens_out)
            peer.tx_data += len(plist)
        if addrs_out:
            addrs = np.array(addrs_out, dtype=np.uint64)
            lens = np.array(lens_out, dtype=np.uint32)
            sent = self.xsk.tx_submit(addrs, lens)
            if sent < len(addrs):
                self.umem.free(addrs[sent:])
            self.xsk.kick()
            self.stats["tx_kicks"] += 1
            self.stats["tx_packets"] += sent
        self.reap()

    def _seal_batch(self, peer: WPeer, kp: WKeypair, first: int, plist: list[Any],
                    tpl: Any, addrs_out: list[int], lens_out: list[int]) -> int:
        """Encrypt one peer's packets with counters first, first+1, ...; returns bytes sent.

        Each packet is copied once, into a UMEM frame behind the cached link header,
        and sealed in place; packets AF_XDP cannot carry go to `_send_raw`.
        """
        mtu = self.spec.mtu
        limit = min(FRAME_SIZE, self.link_mtu + 14) - HEADER_LEN
        frames: list[int] = []
        if tpl is not None:
            frames = self.umem.alloc(len(plist)).tolist()
            if len(frames) < len(plist):
                self.reap()
                frames += self.umem.alloc(len(plist) - len(frames)).tolist()
        mv = self.umem._mv
        seal = kp.sender.encrypt_into
        remote = kp.remote_index
        fill = tpl.fill if tpl is not None else None
        body = HEADER_LEN + 16
        total = 0
        unused: list[int] = []
        for k, packet in enumerate(plist):
            counter = first + k
            n = len(packet)
            plen = padded_len(n, mtu)
            msg_len = plen + 32
            total += msg_len
            nonce = _NONCE0 + counter.to_bytes(8, "little")
            if fill is None or k >= len(frames) or msg_len > limit:
                sealed = kp.sender.encrypt(nonce, bytes(packet) + bytes(plen - n), None)
                self._send_raw(peer.endpoint, _WG_HDR.pack(4, remote, counter) + sealed)  # type: ignore[arg-type]
                if k < len(frames):
                    unused.append(frames[k])
                continue
            addr = frames[k]
            frame = mv[addr : addr + HEADER_LEN + msg_len]  # type: ignore[index]
            fill(frame, msg_len)
            _WG_HDR.pack_into(frame, HEADER_LEN, 4, remote, counter)
            frame[body : body + n] = packet
            if plen > n:
                frame[body + n : body + plen] = _ZEROS[: plen - n]
            seal(nonce, frame[body : body + plen], None, frame[body:])
            addrs_out.append(addr)
            lens_out.append(HEADER_LEN + msg_len)
        if unused:
            self.umem.free(unused)
        return total

    def _send_raw(self, endpoint: tuple[str, int], message: bytes) -> None:
        """Send through the kernel: UDP header by hand, IP header and fragments by the kernel."""
        udp = struct.pack("!HHHH", self.spec.listen_port, endpoint[1], 8 + len(message), 0)
        sock = self.raw6 if ":" in endpoint[0] else self.raw4
        with contextlib.suppress(OSError):
            sock.sendto(udp + message, (endpoint[0], 0))
        self.stats["tx_raw"] += 1

    def reap(self) -> None:
        done = self.xsk.complete()
        if len(done):
            self.umem.free(done)

    # ----------------------------------------------------------------- report

    def flush_report(self) -> None:
        peers = {}
        for pid, p in self.peers.items():
            if p.rx_bytes or p.tx_bytes or p.rx_keepalive:
                peers[pid] = (p.rx_bytes, p.tx_bytes, p.rx_data, p.rx_keepalive, p.tx_data,
                              p.rx_source)
                p.rx_bytes = p.tx_bytes = p.rx_data = p.rx_keepalive = p.tx_data = 0
                p.rx_source = None
        stage, self._stage = self._stage[:256], []
        self.stats["staged"] += len(stage)
        confirm, self._confirm = self._confirm, []
        self.report.send(("report", self.spec.index, peers, confirm, stage, dict(self.stats)))

    # ------------------------------------------------------------------- loop

    def run(self) -> None:
        poll = select.poll()
        xfd, tfd, cfd = self.xsk.fileno(), self.tun.fd, self.cmd.fileno()
        for fd in (xfd, tfd, cfd):
            poll.register(fd, select.POLLIN)
        self.report.send(("ready", self.spec.index))
        next_report = time.monotonic() + REPORT_INTERVAL
        while self.running:
            ready = {fd for fd, _ in poll.poll(REPORT_INTERVAL * 1000)}
            # Commands first: a packet may arrive together with the keypair it needs.
            while self.cmd.poll():
                self.apply(self.cmd.recv())
            if xfd in ready:
                self.rx()
            if tfd in ready:
                self.tx()
            now = time.monotonic()
            # Key confirmations and packets waiting for a handshake cannot wait.
            if now >= next_report or self._confirm or self._stage:
                next_report = now + REPORT_INTERVAL
                self.flush_report()
                self.reap()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.xsk.close()
        with contextlib.suppress(Exception):
            self.umem.close()
        with contextlib.suppress(Exception):
            self.tun.close()
        self.nexthops.close()
        self.raw4.close()
        self.raw6.close()


def _l3(mv: memoryview, a: int) -> tuple[int, int]:
    """(ethertype, offset of the IP header) of the frame at `a`, past one VLAN tag."""
    et = (mv[a + 12] << 8) | mv[a + 13]
    if et == 0x8100 or et == 0x88A8:
        return (mv[a + 16] << 8) | mv[a + 17], a + 18
    return et, a + 14


def _parse_scalar(mv: memoryview, addrs: np.ndarray, lens: np.ndarray) -> tuple[list, ...]:
    """Per-frame header parse: (ok, WireGuard offset, end, receiver index, counter) lists."""
    oks, wgs, ends, idxs, ctrs = [], [], [], [], []
    unpack = _IDX_CTR.unpack_from
    for a, ln in zip(addrs.tolist(), lens.tolist(), strict=True):
        et, l3 = _l3(mv, a)
        end = a + ln
        if et == 0x0800:
            wg = l3 + ((mv[l3] & 15) << 2) + 8
        elif et == 0x86DD:
            wg = l3 + 48
        else:
            wg = end
        if wg + 32 <= end:
            idx, ctr = unpack(mv, wg + 4)
            oks.append(True)
        else:
            idx = ctr = 0
            oks.append(False)
        wgs.append(wg)
        ends.append(end)
        idxs.append(idx)
        ctrs.append(ctr)
    return oks, wgs, ends, idxs, ctrs


def _parse_numpy(buf: np.ndarray, addrs: np.ndarray, lens: np.ndarray) -> tuple[list, ...]:
    """The same parse, vectorized over the batch (worth it only for large batches)."""
    a = addrs.astype(np.int64)
    ln = lens.astype(np.int64)
    et = (buf[a + 12].astype(np.int64) << 8) | buf[a + 13]
    vlan = (et == 0x8100) | (et == 0x88A8)
    l3 = a + 14 + 4 * vlan
    et = np.where(vlan, (buf[a + 16].astype(np.int64) << 8) | buf[a + 17], et)
    v4 = et == 0x0800
    l4 = l3 + np.where(v4, (buf[np.minimum(l3, len(buf) - 1)] & 15).astype(np.int64) * 4, 40)
    wg = l4 + 8
    ok = (wg + 32 <= a + ln) & (v4 | (et == 0x86DD))
    wgc = np.where(ok, wg, a)
    idx = (buf[wgc + 4].astype(np.uint32) | (buf[wgc + 5].astype(np.uint32) << 8)
           | (buf[wgc + 6].astype(np.uint32) << 16) | (buf[wgc + 7].astype(np.uint32) << 24))
    ctr = np.zeros(len(a), dtype=np.uint64)
    for i in range(8):
        ctr |= buf[wgc + 8 + i].astype(np.uint64) << np.uint64(8 * i)
    return ok.tolist(), wg.tolist(), (a + ln).tolist(), idx.tolist(), ctr.tolist()


def _source(mv: memoryview, a: int) -> tuple[str, int]:
    """Outer source address and UDP port of the frame at `a` (for roaming)."""
    et, l3 = _l3(mv, a)
    if et == 0x0800:
        l4 = l3 + ((mv[l3] & 15) << 2)
        return socket.inet_ntop(socket.AF_INET, mv[l3 + 12 : l3 + 16]), \
            (mv[l4] << 8) | mv[l4 + 1]
    l4 = l3 + 40
    return socket.inet_ntop(socket.AF_INET6, mv[l3 + 8 : l3 + 24]), (mv[l4] << 8) | mv[l4 + 1]


def worker_main(spec: WorkerSpec, slots: SessionSlots, cmd: Connection, report: Connection,
                set_xsk: Any) -> None:
    """Entry point of a worker process (forked from the daemon)."""
    # Die with the daemon, even on SIGKILL: a worker must never outlive its keys' owner.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        worker = Worker(spec, slots, cmd, report, set_xsk)
    except OSError as e:
        report.send(("failed", spec.index, f"{type(e).__name__}: {e}"))
        os._exit(1)
    try:
        worker.run()
    except TunGone:
        pass
    except (EOFError, BrokenPipeError):
        pass  # the daemon is gone
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
    finally:
        worker.close()
    os._exit(0)
