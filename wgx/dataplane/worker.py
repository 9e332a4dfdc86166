"""The crypto worker: one process per underlay RX queue, moving packets in batches.

A worker owns one AF_XDP socket (on its queue of the XDP interface) and one
queue of the multi-queue TUN device.

RX: a batch of up to 256 frames from the RX ring. Each frame's headers are read
with one `struct` call in the common layout (Ethernet, IPv4, UDP, WireGuard),
which measures cheaper here than a numpy parse of the batch. Frames are grouped
by receiver index (one group for the usual batch), and per group: one keypair
lookup and expiry check, `decrypt_into` straight from the UMEM frame into the
batch's arena (the only per-packet Python left is this loop; input and output never
share memory), the counters checked and marked
in the shared replay window in one lock round trip (`ReplayWindow.check_many`,
which takes an in-order run in one pass), and the allowed-IPs source check
once per source address. The frames go back to the fill ring in one step, then
the packets are written from the arena to the TUN queue.

TX: a batch read from the TUN queue; the peer per packet by allowed IPs; one
counter range per peer and batch from the shared slot; `encrypt_into` seals
each packet from the TUN read (or a padded staging row) into a UMEM frame behind
a cached Ethernet/IPv4/UDP header; the batch goes onto the TX ring with one kick and
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
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from multiprocessing.connection import Connection
from operator import add, itemgetter, sub
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgx.protocol.allowedips import AllowedIPs

from . import netdev, offload
from .nexthop import HEADER_LEN, NextHops
from .sessions import SessionSlots
from .tun import Tun, TunGone
from .xsk import Umem, XskSocket, as_list

log = logging.getLogger("wgx.worker")

RX_BATCH = 256
TX_BATCH = 64
TX_VNET_BYTES = 8 * 65536  # TSO reads per batch: eight 64 KB super-packets (~360 segments)
REPORT_INTERVAL = 0.05
NEXTHOP_IDLE = 0.005  # next-hop lookups wait for this much idle time (see nexthop.py)
FRAME_SIZE = 2048
# The fill and RX rings are the receive side's buffer while the worker waits for a
# CPU: 4096 frames are ~50 ms at 80k packets/s (the TUN queue: device.TUN_TXQUEUELEN).
# Half the frames again for TX.
RX_RING = 4096
FRAME_COUNT = 2 * RX_RING
_NONCE0 = b"\x00\x00\x00\x00"
_NONCE = struct.Struct("<4xQ")  # 32 zero bits, then the counter (little-endian)
_ZEROS = bytes(16)
_WG_HDR = struct.Struct("<IIQ")
_IDX_CTR = struct.Struct("<IQ")
_WG_HEAD = struct.Struct("<II")  # message type, receiver index
_COUNTER = struct.Struct("<Q")
_V4_DST = struct.Struct("!B15x4s")  # version/IHL, destination address
SEAL_VECTOR_MIN = 8  # equal packets for the numpy frame fill (its fixed cost ~10 us)
_INNER4 = struct.Struct("!BxH8x4s")  # IPv4 version/IHL, total length, source address
_INNER6 = struct.Struct("!4xH2x16s")  # IPv6 payload length, source address
# Header parsing: one struct call per frame for Ethernet + IPv4 (IHL 5) + UDP +
# WireGuard: ethertype (read little-endian), version/IHL, receiver index, counter.
# Measured here at 0.15 us per frame, it beats a numpy parse of the batch at
# every batch size up to 256 (numpy: 0.4-0.6 us per frame at 256, far more below).
_COMMON = struct.Struct("<12xHB31xIQ")
_COMMON_MIN = 42 + 32  # link + IPv4 + UDP headers, then the smallest transport message
_ETH_IPV4_LE = 0x0008
IPV6_CHECKSUM = 7
# Views of a frame's message (start, body with tag, plaintext) are cached by the
# body's end: frames are reused with the same few lengths, and creating the views
# cost about a tenth of a 1420 B packet's decryption. Bounded by clearing.
VIEW_CACHE_MAX = 4096
_START = itemgetter(0)
_SLOT_BASE = range(0, RX_BATCH * FRAME_SIZE, FRAME_SIZE)  # each batch member's arena slot
_SLOT_LIST = list(_SLOT_BASE)
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
    sent_below: int = 0  # every counter this worker sent with it is below this
    tag: int = 0  # its slot's owner tag (0: unchecked)


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
    fault: str | None = None  # tests only: "rx" or "tx" raises on every such batch


class Worker:
    def __init__(self, spec: WorkerSpec, slots: SessionSlots, cmd: Connection,
                 report: Connection, set_xsk: Any) -> None:
        self.spec = spec
        self.slots = slots
        self.cmd = cmd
        self.report = report
        self._init_state()
        self.umem = Umem(FRAME_COUNT, FRAME_SIZE, fill_size=RX_RING)
        self.xsk = XskSocket(spec.ifname, spec.queue, self.umem, rx_size=RX_RING)
        self.xsk.refill()
        set_xsk(spec.queue, self.xsk.fileno())
        self.tun = Tun.create(spec.tun_name, multi_queue=True, vnet_hdr=spec.vnet_hdr)
        self._arena = offload.Arena()
        self.nexthops = NextHops(spec.ifname, spec.listen_port)
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.raw6.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
        self.link_mtu = netdev.get_mtu(spec.ifname) or 1500
        if spec.fault in ("rx", "tx"):
            setattr(self, spec.fault, partial(_injected_fault, spec.fault))

    def _init_state(self) -> None:
        """The worker's own state: keys, peers, allowed IPs, counters, batch buffers."""
        self.running = True
        self.keypairs: dict[int, WKeypair] = {}
        self.peers: dict[int, WPeer] = {}
        self.allowed: AllowedIPs[int] = AllowedIPs()
        self.stats: dict[str, int] = dict.fromkeys((
            "rx_packets", "rx_batches", "tx_packets", "tx_batches", "tx_raw", "tx_kicks",
            "drop_unknown_index", "drop_bad_tag", "drop_replay", "drop_expired",
            "drop_allowedips_source", "drop_bad_inner", "drop_no_peer", "drop_malformed",
            "staged", "rx_out_of_order", "drop_counter_reused", "windows_recovered"), 0)
        self._rx_out: list[memoryview] = []
        self._views: dict[int, tuple[int, memoryview]] = {}  # UMEM bodies, by end
        # RX plaintext: one frame-sized slot per batch member (see `_arena_views`).
        self._amv = memoryview(bytearray(RX_BATCH * FRAME_SIZE))
        self._plain_views: dict[int, list[memoryview]] = {}  # every slot's, by body length
        self._plain_one: dict[int, memoryview] = {}  # by slot offset + body length
        self._tx_views: dict[int, memoryview] = {}  # sealed messages, by frame + plen
        self._tx_bodies = np.empty(TX_BATCH * FRAME_SIZE, np.uint8)  # `_fill_frames` staging
        self._tx_rows: dict[int, list[memoryview]] = {}  # its rows, by stride and length
        self._tx_pad = memoryview(bytearray(FRAME_SIZE))  # one packet's padded staging
        self._reported: dict[str, int] = {}  # the counters as last sent
        self._stage: list[bytes] = []
        self._confirm: list[int] = []
        self._ack = self._acked = 0  # sync tokens: the greatest applied, and reported

    # ---------------------------------------------------------------- commands

    def apply(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "keypair":
            (_, local, slot, peer_id, recv_key, send_key, remote, created, initiator, confirmed,
             tag) = msg
            self.keypairs[local] = WKeypair(
                local, slot, peer_id, ChaCha20Poly1305(recv_key), ChaCha20Poly1305(send_key),
                remote, created, initiator, confirmed, self.slots.window(slot), tag=tag)
        elif kind == "keypair_gone":
            self._forget(msg[1])
            self._ack = msg[2]
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

    def _forget(self, local_index: int) -> None:
        kp = self.keypairs.pop(local_index, None)
        if kp is not None:
            peer = self.peers.get(kp.peer_id)
            if peer is not None and peer.current is kp:
                peer.current = None

    # --------------------------------------------------------------------- RX

    def rx(self) -> None:
        addrs, lens = self.xsk.rx_peek(RX_BATCH)
        n = len(addrs)
        if not n:
            return
        self.stats["rx_batches"] += 1
        self.stats["rx_packets"] += n
        oks, bodies, ends, idxs, ctrs = _parse_headers(self.umem._mv, addrs, lens)
        for index, members in self._by_index(oks, idxs):
            self._rx_keypair(index, members, bodies, ends, ctrs, addrs)
        # The plaintext is in the arena: the frames can go back to the kernel first.
        self.xsk.rx_release(n)
        self.xsk.fill(addrs)
        if self._rx_out:
            self._write_tun()

    def _by_index(self, oks: list[bool], idxs: list[int]) -> Iterable[tuple[int, Sequence[int]]]:
        """The batch's well-formed frames grouped by receiver index, in arrival order."""
        n = len(idxs)
        if oks.count(True) == n and idxs.count(idxs[0]) == n:
            return ((idxs[0], range(n)),)  # the usual batch: one session
        groups: dict[int, list[int]] = {}
        for i, (o, index) in enumerate(zip(oks, idxs, strict=True)):
            if o:
                groups.setdefault(index, []).append(i)
        self.stats["drop_malformed"] += n - oks.count(True)
        return groups.items()

    def _rx_keypair(self, index: int, members: Sequence[int], bodies: list[int],
                    ends: list[int], ctrs: list[int], addrs: np.ndarray) -> None:
        """Decrypt, replay-check and deliver one keypair's frames of the batch.

        Decryption comes before the replay check, as in the kernel: only an
        authenticated counter may move the window (the XDP program already drops
        counters far behind it).
        """
        stats = self.stats
        kp = self.keypairs.get(index)
        if kp is None:
            stats["drop_unknown_index"] += len(members)
            return
        if time.monotonic() - kp.created >= self.spec.reject_after_time:
            stats["drop_expired"] += len(members)
            return
        limit = self.spec.reject_after_messages
        if max(ctrs if len(members) == len(ctrs) else [ctrs[i] for i in members]) >= limit:
            fresh = [i for i in members if ctrs[i] < limit]
            stats["drop_expired"] += len(members) - len(fresh)
            members = fresh
            if not members:
                return
        mv = self.umem._mv
        decrypt = kp.receiver.decrypt_into
        nonce = _NONCE.pack
        whole = len(members) == len(ctrs)
        rows = [list(members), [bodies[i] for i in members] if not whole else bodies,
                [ends[i] for i in members] if not whole else ends,
                [ctrs[i] for i in members] if not whole else ctrs]  # members, starts, stops, ctrs
        if min(rows[3]) <= kp.window.greatest:
            # Not all ahead of the window: those it already holds are dropped before
            # their AEAD call, as the engine does, so replays cost no decryption. (A
            # lock-free read: the authoritative check follows decryption.)
            would = kp.window.would_accept
            seen = [k for k, c in enumerate(rows[3]) if not would(c)]
            if seen:
                stats["drop_replay"] += len(seen)
                rows = _without(seen, rows)
                if not rows[0]:
                    return
        bodies_v = self._rx_views(mv, rows[1], rows[2])
        plains, astarts = self._arena_views(rows[0], rows[1], rows[2])
        bad: list[int] = []
        for (s, body), plain, nonce_b in zip(bodies_v, plains, map(nonce, rows[3]),
                                             strict=True):
            try:
                decrypt(nonce_b, body, None, plain)
            except InvalidTag:
                bad.append(s)
        rows.append(plains)
        rows.append(astarts)
        if bad:
            stats["drop_bad_tag"] += len(bad)
            gone = set(bad)
            rows = _without([k for k, s in enumerate(rows[1]) if s in gone], rows)
            if not rows[0]:
                return
        accepted = self.slots.accept_counting(kp.slot, kp.window, rows[3], kp.tag)
        if accepted is None:  # its slot went to another keypair: this one is dead
            stats["drop_expired"] += len(rows[3])
            self._forget(index)
            return
        verdicts, late = accepted
        stats["rx_out_of_order"] += late
        peer = self.peers.setdefault(kp.peer_id, WPeer(kp.peer_id))
        if not kp.confirmed:
            kp.confirmed = True
            peer.current = kp
            self._confirm.append(index)
        fresh = verdicts.count(True)
        if fresh < len(verdicts):
            stats["drop_replay"] += len(verdicts) - fresh
            rows = _without([k for k, ok in enumerate(verdicts) if not ok], rows)
        members, starts, stops, astarts = rows[0], rows[1], rows[2], rows[5]
        if members:
            peer.rx_bytes += sum(stops) - sum(starts) + 16 * len(starts)
            peer.rx_source = _source(mv, int(addrs[members[-1]]))
            astops = list(map(add, astarts, map(sub, stops, starts)))
            self._deliver(peer, self._amv, astarts, astops, rows[4])

    def _rx_views(self, mv: memoryview, starts: list[int],
                  stops: list[int]) -> list[tuple[int, memoryview]]:
        """(start, body) views of each message body `mv[start:stop]` (ciphertext and tag)."""
        cache = self._views
        views = list(map(cache.get, stops))
        if None in views or list(map(_START, views)) != starts:
            if len(cache) > VIEW_CACHE_MAX:
                cache.clear()
            for k, (s, e) in enumerate(zip(starts, stops, strict=True)):
                v = views[k]
                if v is None or v[0] != s:
                    views[k] = cache[e] = (s, mv[s:e])
        return views

    def _arena_views(self, members: list[int], starts: list[int],
                     stops: list[int]) -> tuple[list[memoryview], list[int]]:
        """(plaintext views, their arena offsets) for the bodies `[start:stop]` of the
        batch members `members`: member m's plaintext goes to the start of arena slot m.

        Decryption writes there, never into the frame it reads: `decrypt_into` refuses
        (cryptography >= 51) or garbles (before) an output that shares memory with its
        input. The usual batch (members 0..n-1, one length) takes a slice of a cached
        list; others one cached view per member and length."""
        lengths = list(map(sub, stops, starts))
        n = len(members)
        if members[-1] == n - 1 and lengths.count(lengths[0]) == n:  # members are 0..n-1
            views = self._plain_views.get(lengths[0])
            if views is None:
                if len(self._plain_views) > VIEW_CACHE_MAX // RX_BATCH:
                    self._plain_views.clear()
                views = self._plain_views[lengths[0]] = [
                    self._amv[a : a + lengths[0] - 16] for a in _SLOT_BASE]
            return views[:n], _SLOT_LIST[:n]
        astarts = list(map(_SLOT_BASE.__getitem__, members))
        keys = list(map(add, astarts, lengths))  # slot and length (< FRAME_SIZE)
        cache = self._plain_one
        views = list(map(cache.get, keys))
        if None in views:
            if len(cache) > VIEW_CACHE_MAX:
                cache.clear()
            for k, key in enumerate(keys):
                if views[k] is None:
                    a = astarts[k]
                    views[k] = cache[key] = self._amv[a : a + lengths[k] - 16]
        return views, astarts

    def _deliver(self, peer: WPeer, mv: memoryview, starts: list[int], stops: list[int],
                 plain: list[memoryview]) -> None:
        """Queue one peer's decrypted bodies `mv[start:stop]` (plaintext, then the tag; its
        plaintext views `plain`) for the TUN: keepalives counted, padding cut, and a
        packet whose source address is not one of the peer's allowed IPs dropped (looked
        up once per source and batch)."""
        stats = self.stats
        out = self._rx_out
        owner = self.allowed.lookup_packet_src
        peer_id = peer.peer_id
        v4, v6 = _INNER4.unpack_from, _INNER6.unpack_from
        # The usual batch, in C-level passes: IPv4 packets (IHL >= 5) whose total
        # lengths fit their bodies, all from one source address.
        vihls, lengths, srcs = zip(*map(v4, repeat(mv), starts), strict=True)
        slack = list(map(sub, lengths, map(sub, stops, starts)))  # -16: no padding
        if (min(vihls) >= 0x45 and max(vihls) <= 0x4F and min(lengths) >= 20
                and max(slack) <= -16 and srcs.count(srcs[0]) == len(srcs)):
            peer.rx_data += len(starts)
            if owner(plain[0]) == peer_id:
                if min(slack) == -16:
                    out.extend(plain)
                else:
                    out.extend(map(mv.__getitem__, map(slice, starts, map(add, starts,
                                                                          lengths))))
            else:
                stats["drop_allowedips_source"] += len(starts)
            return
        verdicts: dict[bytes, bool] = {}
        data = 0
        for s, e in zip(starts, stops, strict=True):
            n = e - s - 16
            # Reading 20 bytes is safe for a short payload too: its tag and frame follow.
            vihl, length, src = v4(mv, s)
            if vihl >> 4 != 4 or not 20 <= length <= n:
                if not n:
                    peer.rx_keepalive += 1
                    continue
                length = 0
                if vihl >> 4 == 6 and n >= 40:
                    payload, src = v6(mv, s)
                    if payload + 40 <= n:
                        length = payload + 40
                if not length:
                    stats["drop_bad_inner"] += 1
                    continue
            data += 1
            ok = verdicts.get(src)
            if ok is None:
                ok = verdicts[src] = owner(mv[s : s + length]) == peer_id
            if not ok:
                stats["drop_allowedips_source"] += 1
                continue
            out.append(mv[s : s + length])
        peer.rx_data += data

    def _write_tun(self) -> None:
        """Write the batch's packets; with offloads, in-order TCP runs (and, in large
        batches, UDP runs if the TUN took USO) as one super-packet."""
        out, self._rx_out = self._rx_out, []
        if self.tun.vnet_hdr:
            udp = self.tun.uso and len(out) >= offload.UDP_COALESCE_MIN_BATCH
            for buf in offload.coalesce(out, udp=udp):
                self.tun.write_vnet(buf)
        else:
            for packet in out:
                self.tun.write(packet)

    # --------------------------------------------------------------------- TX

    def tx(self) -> None:
        if self.tun.vnet_hdr:
            raw = self.tun.read_batch(TX_BATCH, TX_VNET_BYTES)
            packets: Any = offload.split_gso_batch(raw, self.spec.mtu, arena=self._arena)
        else:
            packets = self.tun.read_batch(TX_BATCH)
        if not packets:
            return
        self.stats["tx_batches"] += 1
        by_peer = self._by_peer(packets)
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
            first = self.slots.reserve(kp.slot, len(plist), kp.tag)
            if first is None or first < kp.sent_below:
                # The slot went to another keypair, or its counter went back under this
                # one: sending would reuse nonces. Never again with this keypair (the
                # daemon revokes it and handshakes anew).
                log.error("keypair %08x: slot %d taken over or counter gone back (%s, "
                          "sent below %d); keypair dropped", kp.local_index, kp.slot, first,
                          kp.sent_below)
                self.stats["drop_counter_reused"] += len(plist)
                self._forget(kp.local_index)
                self.report.send(("revoked", self.spec.index, kp.local_index))
                continue
            kp.sent_below = first + len(plist)
            tpl = self.nexthops.header(peer.endpoint, now)
            peer.tx_bytes += self._seal_batch(peer, kp, first, plist, tpl, addrs_out, lens_out)
            peer.tx_data += len(plist)
        if addrs_out:
            sent = self.xsk.tx_submit(addrs_out, lens_out)
            if sent < len(addrs_out):
                self.umem.free(addrs_out[sent:])
            self.xsk.kick()
            self.stats["tx_kicks"] += 1
            self.stats["tx_packets"] += sent
        self.reap()

    def _by_peer(self, packets: list[Any]) -> dict[int, list[Any]]:
        """The batch's packets grouped by the peer whose allowed IPs hold their destination,
        in order (looked up once per destination); those with none are counted and dropped.
        The usual batch, IPv4 packets to one address, takes C-level passes."""
        lookup = self.allowed.lookup_packet_dst
        if isinstance(packets, offload.UniformBatch):  # without making its packet list
            head = packets.ipv4_destination()
            if head is not None:
                peer_id = lookup(head)
                if peer_id is not None:
                    return {peer_id: packets}
                self.stats["drop_no_peer"] += len(packets)
                return {}
        if min(map(len, packets)) >= 20:
            heads = set(map(_V4_DST.unpack_from, packets))  # (version/IHL, destination)
            if len(heads) == 1 and next(iter(heads))[0] >> 4 == 4:
                peer_id = lookup(packets[0])
                if peer_id is not None:
                    return {peer_id: packets}
                self.stats["drop_no_peer"] += len(packets)
                return {}
        by_peer: dict[int, list[Any]] = {}
        owners: dict[bytes, int | None] = {}  # destination -> peer
        for p in packets:
            version = p[0] >> 4 if p else 0
            if version == 4 or version == 6:
                dst = bytes(p[16:20]) if version == 4 else bytes(p[24:40])
                peer_id = owners.get(dst, -1)
                if peer_id == -1:
                    peer_id = owners[dst] = lookup(p)
            else:
                peer_id = None
            if peer_id is None:
                self.stats["drop_no_peer"] += 1
                continue
            by_peer.setdefault(peer_id, []).append(p)
        return by_peer

    def _seal_batch(self, peer: WPeer, kp: WKeypair, first: int, plist: list[Any],
                    tpl: Any, addrs_out: list[int], lens_out: list[int]) -> int:
        """Encrypt one peer's packets with counters first, first+1, ...; returns bytes sent.

        Each packet is sealed from where it is (the TUN read, or a padded staging row
        when it needs padding or checksums) into a UMEM frame behind the cached link
        header: input and output never share memory, which `encrypt_into` refuses
        (cryptography >= 51) or garbles (before). Packets AF_XDP cannot carry go to
        `_send_raw`.
        """
        mtu = self.spec.mtu
        limit = min(FRAME_SIZE, self.link_mtu + 14) - HEADER_LEN
        frames: list[int] = []
        if tpl is not None:
            frames = as_list(self.umem.alloc(len(plist)))
            if len(frames) < len(plist):
                self.reap()
                frames += as_list(self.umem.alloc(len(plist) - len(frames)))
        mv = self.umem._mv
        seal = kp.sender.encrypt_into
        nonce = _NONCE.pack
        put_counter = _COUNTER.pack_into
        remote = kp.remote_index
        # link header + WireGuard type and receiver, per message length (one or two a batch)
        prefixes: dict[int, bytes] = {}
        wg_head = _WG_HEAD.pack(4, remote)
        counter_at = HEADER_LEN + 8
        body_at = HEADER_LEN + 16
        nframes = len(frames)
        total = 0
        unused: list[int] = []
        sealed_views = self._tx_views  # a frame's sealed message, by frame start + padded length
        if len(sealed_views) > VIEW_CACHE_MAX:
            sealed_views.clear()
        uniform = isinstance(plist, offload.UniformBatch)
        n = plist.n if uniform else len(plist[0])
        if nframes == len(plist) >= SEAL_VECTOR_MIN and (
                uniform or list(map(len, plist)).count(n) == nframes):
            # The usual batch, equal packets: headers and counters go into the frames in a
            # few numpy calls, then one C-level pass of AEAD calls seals into them.
            plen = (n + 15) & ~15
            if mtu and plen > mtu:
                plen = max(mtu, n)
            if plen + 32 <= limit:
                sources = self._fill_frames(frames, plist, tpl.header(plen + 32) + wg_head,
                                            first, n, plen)
                ends = [a + plen for a in frames]
                vs = list(map(sealed_views.get, ends))
                if None in vs:
                    for k, e in enumerate(ends):
                        if vs[k] is None:
                            b = e - plen + body_at
                            vs[k] = sealed_views[e] = mv[b : b + plen + 16]
                deque(map(seal, map(nonce, range(first, first + nframes)), sources,
                          repeat(None), vs), maxlen=0)
                addrs_out += frames
                lens_out += [HEADER_LEN + plen + 32] * nframes
                return (plen + 32) * nframes
        pad = self._tx_pad
        for k, packet in enumerate(plist):
            counter = first + k
            n = len(packet)
            plen = (n + 15) & ~15  # padded_len(), inline: this loop is the TX hot path
            if mtu and plen > mtu:
                plen = max(mtu, n)
            msg_len = plen + 32
            total += msg_len
            if tpl is None or k >= nframes or msg_len > limit:
                sealed = kp.sender.encrypt(nonce(counter), bytes(packet) + bytes(plen - n), None)
                self._send_raw(peer.endpoint, _WG_HDR.pack(4, remote, counter) + sealed)  # type: ignore[arg-type]
                if k < nframes:
                    unused.append(frames[k])
                continue
            addr = frames[k]
            prefix = prefixes.get(msg_len)
            if prefix is None:
                prefix = prefixes[msg_len] = tpl.header(msg_len) + wg_head
            mv[addr : addr + counter_at] = prefix
            put_counter(mv, addr + counter_at, counter)
            if plen > n:  # padded in the staging row
                pad[:n] = packet
                pad[n:plen] = _ZEROS[: plen - n]
                packet = pad[:plen]
            out = sealed_views.get(addr + plen)  # frames are FRAME_SIZE-aligned
            if out is None:
                b = addr + body_at
                out = sealed_views[addr + plen] = mv[b : b + plen + 16]
            seal(nonce(counter), packet, None, out)
            addrs_out.append(addr)
            lens_out.append(HEADER_LEN + msg_len)
        if unused:
            self.umem.free(unused)
        return total

    def _fill_frames(self, frames: list[int], plist: list[Any], prefix: bytes, first: int,
                     n: int, plen: int) -> Sequence[Any]:
        """Lay out equal packets of `n` bytes for sealing: in each frame the link and
        WireGuard header `prefix` and the counters first, first+1, ...; returns what to
        seal, one `plen`-byte plaintext per frame: the packets themselves if they need
        neither padding nor checksums, else staging rows (packet, zero padding)."""
        k = len(plist)
        rows = np.array(frames, np.intp) // FRAME_SIZE
        u = self.umem.buf.reshape(-1, FRAME_SIZE)  # type: ignore[union-attr]
        counter_at, body_at = HEADER_LEN + 8, HEADER_LEN + 16
        u[rows, :counter_at] = np.frombuffer(prefix, np.uint8)
        u[rows, counter_at:body_at] = np.arange(first, first + k, dtype="<u8").view(
            np.uint8).reshape(k, 8)
        uniform = isinstance(plist, offload.UniformBatch)
        if plen == n and not uniform:
            return plist
        stride = (plen + 1) & ~1  # `UniformBatch.fill` wants rows of even length
        if len(self._tx_bodies) < k * stride:
            self._tx_bodies = np.empty(k * stride, np.uint8)
            self._tx_rows.clear()
        bodies = self._tx_bodies[: k * stride].reshape(k, stride)
        if uniform:  # its checksums are completed on the way
            plist.fill(bodies, 0)
        else:
            bodies[:, :n] = np.frombuffer(b"".join(plist), np.uint8).reshape(k, n)
        if plen > n:
            bodies[:, n:plen] = 0
        key = stride * FRAME_SIZE + plen
        views = self._tx_rows.get(key)
        if views is None or len(views) < k:
            whole = memoryview(self._tx_bodies)
            views = self._tx_rows[key] = [whole[r : r + plen]
                                          for r in range(0, len(self._tx_bodies) - plen + 1,
                                                         stride)]
        return views[:k]

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
        """Send the control plane what changed since the last report: per-peer traffic
        (timers, roaming), confirmed keypairs, packets waiting for a handshake, and the
        counters.  Nothing to say, nothing sent: an idle worker does not wake the daemon."""
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
        self.stats["windows_recovered"] = self.slots.windows_recovered
        stats = dict(self.stats)
        if not (peers or confirm or stage) and stats == self._reported:
            return
        self._reported = stats
        self.report.send(("report", self.spec.index, peers, confirm, stage, stats))

    # ------------------------------------------------------------------- loop

    def run(self) -> None:
        poll = select.poll()
        xfd, tfd, cfd = self.xsk.fileno(), self.tun.fd, self.cmd.fileno()
        for fd in (xfd, tfd, cfd):
            poll.register(fd, select.POLLIN)
        self.report.send(("ready", self.spec.index))
        next_report = time.monotonic() + REPORT_INTERVAL
        while self.running:
            hops = self.nexthops
            wait = NEXTHOP_IDLE if hops.stale else REPORT_INTERVAL
            ready = {fd for fd, _ in poll.poll(wait * 1000)}
            if hops.stale and not ready:
                hops.refresh()  # idle: no reply is likely on its way to wait behind it
            # Commands first: a packet may arrive together with the keypair it needs.
            if cfd in ready:
                while self.cmd.poll():
                    self.apply(self.cmd.recv())
                if self._ack != self._acked:  # the daemon frees their slots on this
                    self.report.send(("ack", self.spec.index, self._ack))
                    self._acked = self._ack
            if xfd in ready:
                self.rx()
            if tfd in ready:
                self.tx()
            now = time.monotonic()
            if hops.overdue(now):  # never idle: after the batch, then
                hops.refresh(now)
            # Key confirmations and packets waiting for a handshake cannot wait.
            if now >= next_report or self._confirm or self._stage:
                next_report = now + REPORT_INTERVAL
                self.flush_report()
                self.reap()

    def close(self) -> None:
        self._views.clear()  # they pin the UMEM mapping
        self._tx_views.clear()
        self._tx_rows.clear()
        self._plain_views.clear()
        self._plain_one.clear()
        self._rx_out.clear()
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


def _parse_headers(mv: memoryview, addrs: np.ndarray | list[int],
                   lens: np.ndarray | list[int]) -> tuple[list, ...]:
    """Per-frame header parse: (ok, body offset, end, receiver index, counter) lists.

    The body is the WireGuard message past its 16-byte header: ciphertext and tag.

    The usual frame (Ethernet, IPv4 without options) takes one `struct` call; VLAN
    tags, IPv6 and IP options take the general path.
    """
    alist, llist = as_list(addrs), as_list(lens)
    common = _COMMON.unpack_from
    if min(llist) >= _COMMON_MIN:  # the usual batch, in C-level passes
        ets, vihls, idx_t, ctr_t = zip(*map(common, repeat(mv), alist), strict=True)
        n = len(alist)
        if ets.count(_ETH_IPV4_LE) == n and vihls.count(0x45) == n:
            return ([True] * n, list(map(add, alist, repeat(58))), list(map(add, alist, llist)),
                    list(idx_t), list(ctr_t))
    oks, bodies, ends, idxs, ctrs = [], [], [], [], []
    unpack = _IDX_CTR.unpack_from
    for a, ln in zip(alist, llist, strict=True):
        end = a + ln
        if ln >= _COMMON_MIN:
            ethertype, vihl, idx, ctr = common(mv, a)
            if ethertype == _ETH_IPV4_LE and vihl == 0x45:
                oks.append(True)
                bodies.append(a + 58)
                ends.append(end)
                idxs.append(idx)
                ctrs.append(ctr)
                continue
        et, l3 = _l3(mv, a)
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
        bodies.append(wg + 16)
        ends.append(end)
        idxs.append(idx)
        ctrs.append(ctr)
    return oks, bodies, ends, idxs, ctrs


def _without(drop: list[int], columns: list[list[int]]) -> list[list[int]]:
    """`columns` (equally long) without the rows at the positions in `drop`."""
    gone = set(drop)
    return [[v for k, v in enumerate(col) if k not in gone] for col in columns]


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
    code = 0
    try:
        worker.run()
    except TunGone:
        pass
    except (EOFError, BrokenPipeError):
        pass  # the daemon is gone
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.EBADF:
            pass  # a descriptor closed under us: the daemon is shutting down
        else:
            code = 1
            log.exception("worker %d crashed", spec.index)
            with contextlib.suppress(Exception):
                report.send(("crashed", spec.index, crash_summary(e)))
    finally:
        worker.close()
    os._exit(code)


def _injected_fault(where: str) -> None:
    raise RuntimeError(f"injected fault in {where} (WGX_TEST_WORKER_FAULT={where})")


def crash_summary(e: BaseException) -> str:
    """One line for `wgx show`: the exception and where it was raised."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ""
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" (in {code.co_name}, {os.path.basename(code.co_filename)}:{tb.tb_lineno})"
    return f"{type(e).__name__}: {e}{where}"[:300]
