"""TUN offloads: virtio-net headers, TSO/USO splitting and TCP/UDP coalescing (GRO).

A TUN opened with IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6[|USO4|USO6])
exchanges every packet with a 10-byte `struct virtio_net_hdr` in front
(little-endian on x86)::

    u8 flags; u8 gso_type; u16 hdr_len; u16 gso_size; u16 csum_start; u16 csum_offset

Read side (kernel -> us -> encrypt): the kernel hands over TSO "super-packets"
of up to 64 KB (gso_type TCPV4/TCPV6, or UDP_L4 with USO) whose transport
checksum is only the pseudo-header partial sum (NEEDS_CSUM = CHECKSUM_PARTIAL).
`split_gso_batch` cuts them into MTU-sized IP packets with numpy, never per
packet in Python: a super-packet of n segments becomes an (n, stride) array,
one row per segment; the header template is broadcast into every row, the
payload copied as one reshape, sequence numbers and IPv4 IDs written as
columns through big-endian views, every row's transport words summed by one
`sum(axis=1)`, and the IPv4 header checksums derived arithmetically (they
differ only by the ID).  About 20 numpy calls per super-packet, whatever its
size.  With CSUM offload the kernel also leaves the checksum of every small
packet to us (NEEDS_CSUM without GSO): those of a batch are completed by one
`np.add.reduceat` over their concatenation, or in Python (big-integer
arithmetic) when they are few or tiny and numpy's fixed cost would dominate.

Write side (decrypt -> us -> kernel): `coalesce` merges the in-order TCP
segments of one flow in a batch into one super-packet with a virtio-net header
(gso_type TCPV4/TCPV6, NEEDS_CSUM, csum_start = IP header length,
csum_offset = 16, and the pseudo-header partial sum in the TCP checksum field),
so the kernel's TCP receive path runs once per super-packet instead of once per
segment.  With `udp=True` (only when the TUN accepted USO4|USO6: older kernels
refuse UDP_L4 on write) it also merges the consecutive same-size datagrams of
a UDP flow into one USO super-packet (gso_type UDP_L4, csum_offset = 6, UDP
length = 8 + total payload, the pseudo-header partial sum over that length in
the UDP checksum field): one TUN write per run instead of one per datagram.
The kernel segments it again before the socket (udp_rcv_segment ->
__udp_gso_segment, which rewrites each segment's UDP length and adjusts the
partial sum by the length difference; IPv4 IDs +1 per segment), unless the
socket enabled UDP_GRO and takes it whole.  Everything else is written with
an all-zero header (no GSO, no checksum flags): the kernel then verifies
checksums itself, like on a plain TUN.  (The tun driver ignores F_DATA_VALID
on write; tests/test_offload_tun.py checks that.)

Checksums of coalesced packets ARE verified (vectorized over the batch) before
merging.  The packet was authenticated by the AEAD, but the TCP/UDP checksum is
end to end: the peer may be a router that forwarded a segment corrupted on its LAN.
A merged packet goes to the kernel as CHECKSUM_PARTIAL, which the kernel
trusts, so merging without verifying would launder such a segment into the
socket.  The kernel's own GRO and wireguard-go (checksumValid in
tun/offload_linux.go, since its first GRO version) verify for the same
reason.  A segment that fails is not merged; it is written alone with a zero
header, the kernel drops it and counts TcpInCsumErrors (UDP: UdpInCsumErrors,
Udp6InCsumErrors), and TCP retransmits it.  An IPv4 UDP checksum of 0 means
"none" and is merged unverified (the kernel fills in a real one per segment);
over IPv6, 0 is invalid and such a datagram goes out alone.  (wireguard-go
once wrote such packets with a stale virtio header, wireguard-go PR #145; here
every unmerged packet gets a fresh zero header.)

Garbage in, no exceptions out: every function here accepts arbitrary bytes.
`split_gso_batch` passes packets without GSO and without NEEDS_CSUM through
untouched (whatever they contain; routing drops junk later) and drops, with a
count in `OffloadStats`, every buffer it cannot make sense of (shorter than a
virtio-net header, unknown gso_type, GSO headers that do not match the packet,
checksum offsets outside the packet).  `coalesce` never drops: a packet it does
not understand is emitted unchanged with a zero header.

Everything is a pure function on bytes-like objects (bytes, bytearray,
memoryview); only `set_tun_offload` touches a file descriptor.

Relation to wireguard-go (tun/offload_linux.go, tun/tun_linux.go), read for
semantics: same offload set (CSUM|TSO4|TSO6 required, USO4|USO6 if accepted),
same split rules (header length from csum_start + TCP data offset, IPv4 ID +1
per segment, FIN/PSH only on the last segment), same coalescing rules (flow =
addresses + ports, equal ACK, TOS/TTL/DF or traffic class/hop limit, equal TCP
options, only ACK or ACK|PSH, PSH ends a run, a shorter segment ends a run)
and the same output headers.  Differences: CWR is cleared after the first
segment like the kernel's tcp_gso_segment (wireguard-go keeps it on all); a
run also needs an equal window and, without DF, consecutive IPv4 IDs, and
only ever grows at its end (wireguard-go also prepends and merges into older
runs of a flow, which reorders) so per-flow order is kept exactly; `mtu` may
re-segment TCP to a smaller size.  UDP merging (wireguard-go's udpGRO) follows
the same IP rules as TCP here, so it also needs consecutive IPv4 IDs without
DF, never merges IPv6 datagrams with checksum 0, and caps a run at 64
datagrams (UDP_MAX_SEGMENTS before Linux 6.9).
"""

from __future__ import annotations

import fcntl
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

Buffer = bytes | bytearray | memoryview

# --------------------------------------------------------------------- constants

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3  # UFO: never enabled here (TUN_F_UFO is not requested)
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETVNETHDRSZ = 0x800454D7
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
TUN_UDP_OFFLOADS = TUN_F_USO4 | TUN_F_USO6

TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
MAX_IP_PACKET = 65535
DEFAULT_MAX_SEGMENTS = 64

_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_PROTO_TCP, _PROTO_UDP = 6, 17
_M = 0xFFFF  # ones' complement arithmetic is arithmetic modulo 0xffff

_VNET = struct.Struct("<BBHHHH")
_CSUM_FIELDS = struct.Struct("<HH")  # csum_start, csum_offset at byte 6 of the header
VNET_ZERO = bytes(VNET_HDR_LEN)
_H = struct.Struct("!H")
_I = struct.Struct("!I")
# IPv4 header (no options) + TCP header up to the window, as one unpack:
# version/IHL+TOS, total length, ID, flags/fragment+TTL+protocol, (checksum
# skipped), addresses, ports, seq, ack, data offset+flags, window.
_V4TCP = struct.Struct("!HHHI2xQIIIHH")
# IPv6 fixed header + TCP header up to the window: version/class/flow label,
# payload length, next header+hop limit, addresses, ports, seq, ack, offset+flags,
# window.
_V6TCP = struct.Struct("!IHH32sIIIHH")
# IPv4 header (no options) + UDP header: version/IHL+TOS, total length, ID,
# flags/fragment+TTL+protocol, (checksum skipped), addresses, ports, length, checksum.
_V4UDP = struct.Struct("!HHHI2xQIHH")
# What the equal-size datagrams of one IPv4 UDP flow share: version/IHL, TOS and
# total length; flags/fragment, TTL and protocol; addresses, ports and UDP length.
_V4UDP_FLOW = struct.Struct("!I2xI2x14s")
# IPv6 fixed header + UDP header: word 0, payload length, next header+hop limit,
# addresses, ports, length, checksum.
_V6UDP = struct.Struct("!IHH32sIHH")
# Segments per UDP super-packet at most: virtio_net_hdr_to_skb refuses more than
# UDP_MAX_SEGMENTS (64 before Linux 6.9, 128 since).
UDP_MAX_SEGMENTS = 64

# Below these sizes the scalar (big-int) checksum beats numpy's fixed cost.
_SCALAR_JOB_BYTES = 512  # a NEEDS_CSUM packet this small is finished in Python
# Callers merge UDP runs only in batches of at least this many packets: merging
# one flow's datagrams costs, over writing them singly, about 1.8 / 1.3 / 1.05 /
# 0.72 / 0.47 us more Python per datagram at batches of 8 / 12 / 16 / 32 / 64
# (`python -m wgx.dataplane.offload`), against ~1.6 us of kernel time saved per
# write avoided (docs/udp-coalescing.md): a loss at ~8, a gain from ~12.
UDP_COALESCE_MIN_BATCH = 16
_VECTOR_MIN_SEGMENTS = 4  # a super-packet of fewer segments: scalar path
_VECTOR_MIN_CSUM = 4  # fewer big NEEDS_CSUM packets than this in a batch: scalar path
_VECTOR_MIN_VERIFY = 6  # fewer coalescing candidates than this: scalar verify


# ------------------------------------------------------------------ virtio header


class VnetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def parse_vnet_hdr(buf: Buffer) -> VnetHdr | None:
    """The virtio_net_hdr at the start of `buf`, or None if `buf` is shorter than 10 bytes."""
    if len(buf) < VNET_HDR_LEN:
        return None
    return VnetHdr(*_VNET.unpack_from(buf))


def pack_vnet_hdr(
    flags: int = 0,
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """10 bytes of virtio_net_hdr; raises ValueError if a field does not fit its width."""
    try:
        return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    except struct.error as e:
        raise ValueError(str(e)) from None


def set_tun_offload(fd: int, flags: int = TUN_TCP_OFFLOADS | TUN_UDP_OFFLOADS) -> int:
    """TUNSETOFFLOAD on a TUN fd opened with IFF_VNET_HDR; returns the flags in effect.

    Like wireguard-go: CSUM|TSO4|TSO6 are required (OSError if refused); the
    other bits (USO4|USO6 by default) are dropped together if the kernel refuses
    them.  Linux >= 6.2 accepts USO, but only USO4 and USO6 together (6.18:
    either alone is EINVAL); TSO without CSUM is always EINVAL.
    """
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        return flags
    except OSError:
        base = flags & TUN_TCP_OFFLOADS
        if base == flags:
            raise
    fcntl.ioctl(fd, TUNSETOFFLOAD, base)
    return base


# ----------------------------------------------------------------------- checksums


def _sum_mod(data: Buffer) -> int:
    """Sum of the big-endian 16-bit words of `data` (odd tail zero-padded), modulo 0xffff.

    The Internet checksum is ones' complement arithmetic, i.e. arithmetic modulo
    0xffff (2**16 == 1 mod 0xffff), so a whole buffer read as one big integer
    has the same residue as the sum of its words.
    """
    v = int.from_bytes(data, "big")
    return (v << 8) % _M if len(data) & 1 else v % _M


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """RFC 1071 folded ones' complement sum of `data` plus `initial`, in 0..0xffff.

    It is 0 only if every word (and `initial`) is zero; otherwise 1..0xffff.
    """
    r = (_sum_mod(data) + initial) % _M
    if r:
        return r
    return _M if (initial or any(data)) else 0


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The checksum to store: ~(ones' complement sum of `data` + `initial`) & 0xffff."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def _l4_csum(r: int) -> int:
    """Transport checksum for a residue r (sum mod 0xffff); never 0, like
    skb_checksum_help (0 would mean "no checksum" to UDP)."""
    return _M - r


def _ip_csum(r: int) -> int:
    """IPv4 header checksum for a residue r, exactly as ip_fast_csum computes it."""
    return _M - r if r else 0


def _addr_sum(pkt: Buffer, v6: bool) -> int:
    """Residue of the pseudo-header address words (src + dst)."""
    return _sum_mod(pkt[8:40]) if v6 else _sum_mod(pkt[12:20])


def pseudo_header_sum(pkt: Buffer, proto: int, l4_len: int) -> int:
    """Folded (not complemented) pseudo-header sum of the IPv4/IPv6 packet `pkt`.

    This is what goes into the transport checksum field for CHECKSUM_PARTIAL.
    """
    v6 = len(pkt) > 0 and pkt[0] >> 4 == 6
    r = (_addr_sum(pkt, v6) + proto + l4_len) % _M
    return r or _M


# -------------------------------------------------------------------- statistics


@dataclass
class OffloadStats:
    """Counters; pass one instance to the functions below and it accumulates."""

    split_in: int = 0  # buffers given to split_gso_batch
    split_passthrough: int = 0  # no GSO, no NEEDS_CSUM: returned as they came
    split_csum_completed: int = 0  # no GSO, NEEDS_CSUM: checksum finished by us
    split_gso: int = 0  # super-packets split
    split_segments: int = 0  # segments produced from super-packets
    split_dropped: int = 0  # unparseable or inconsistent: dropped
    split_too_big: int = 0  # UDP GSO segments larger than the MTU: dropped (in split_dropped)
    coalesce_in: int = 0  # packets given to coalesce
    coalesce_out: int = 0  # buffers returned (each is one TUN write)
    coalesce_merged: int = 0  # packets that went into a super-packet
    coalesce_super: int = 0  # super-packets built
    coalesce_udp_merged: int = 0  # UDP datagrams among coalesce_merged
    coalesce_udp_super: int = 0  # UDP (USO) super-packets among coalesce_super
    coalesce_bad_csum: int = 0  # candidates whose TCP, UDP or IPv4 checksum was wrong

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_NOSTATS = OffloadStats()  # scratch sink when the caller passes none

# -------------------------------------------------------------------- split (read)

# A job is one input packet that needs work: (pkt, kind, l4, hlen, seg, nseg,
# plen, csum_off, seed, id0, seq0), where kind is one of:
_K_CSUM, _K_TCP4, _K_TCP6, _K_UDP4, _K_UDP6 = 0, 1, 2, 3, 4
# pkt: memoryview of the IP packet; l4: transport header offset (= csum_start);
# hlen: header bytes copied into every segment; seg: payload bytes per segment;
# nseg: number of segments; plen: total payload; csum_off: checksum field offset
# from l4; seed: residue to add to the transport sum (the pseudo-header address
# words + protocol for GSO kinds, the kernel's partial sum for _K_CSUM);
# id0/seq0: IPv4 ID and TCP sequence number of the first segment.


def split_gso(
    buf: Buffer, mtu: int, stats: OffloadStats | None = None, arena: Arena | None = None
) -> list[memoryview]:
    """Split what one read() from an IFF_VNET_HDR TUN returned; see `split_gso_batch`."""
    return split_gso_batch([buf], mtu, stats, arena)


class Arena:
    """A reusable output buffer for `split_gso_batch`.

    Without one, every call allocates its output; a batch of several 64 KB
    super-packets then needs more than glibc's mmap/trim thresholds and pays
    a page fault per 4 KB on every call (measured: ~50% slower).  With an
    arena, the packets of a call are views into it and stay valid until the
    next call that uses the same arena: consume (encrypt) them before that.
    Calls that need more than `size` bytes fall back to allocating.
    """

    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = np.empty(size, np.uint8)
        self.mv = memoryview(self.buf)
        self._pos = 0

    def reset(self) -> None:
        self._pos = 0

    def take(self, n: int) -> tuple[np.ndarray, memoryview] | None:
        """n bytes of the arena (as an array and a memoryview), or None if full."""
        pos = self._pos
        if pos + n > len(self.buf):
            return None
        self._pos = pos + ((n + 7) & ~7)
        return self.buf[pos : pos + n], self.mv[pos : pos + n]


def _alloc(arena: Arena | None, n: int) -> tuple[np.ndarray, memoryview]:
    if arena is not None:
        got = arena.take(n)
        if got is not None:
            return got
    a = np.empty(n, np.uint8)
    return a, memoryview(a)


def split_gso_batch(
    bufs: Sequence[Buffer],
    mtu: int,
    stats: OffloadStats | None = None,
    arena: Arena | None = None,
) -> list[memoryview] | UniformBatch:
    """Turn TUN reads (virtio-net header + packet each) into plain IP packets to encrypt.

    Returns memoryviews, in input order (the segments of a super-packet in
    sequence order); for the usual batch of one UDP flow, a `UniformBatch` that
    reads as them.  A packet that needs no work is a view into its input
    buffer; everything else is a view into memory owned by this call (or into
    `arena`, see `Arena`).  Treat the views as read-only.

    Per input buffer, by virtio-net header:
      - gso NONE, no NEEDS_CSUM: the packet, untouched;
      - gso NONE, NEEDS_CSUM: the packet with the checksum at csum_start +
        csum_offset completed over the data from csum_start, seeded with the
        pseudo-header partial sum the kernel left in that field;
      - TCPV4/TCPV6 (ECN bit tolerated): segments of at most gso_size payload
        bytes (fewer if `mtu` demands it: TCP may be re-segmented).  Every
        segment gets the IP and TCP headers of the super-packet with the IPv4
        total length, ID (+1 per segment) and header checksum, or the IPv6
        payload length, fixed; the TCP sequence number advanced by the payload
        offset; FIN and PSH kept only on the last segment and CWR only on the
        first (as the kernel's tcp_gso_segment); the TCP checksum in full.
      - UDP_L4 (USO): segments of exactly gso_size payload bytes (the last may
        be shorter) with UDP length and checksum fixed.  A segment larger than
        `mtu` cannot be re-segmented (datagram boundaries) and is dropped.
    The header length is taken from the packet (csum_start + TCP data offset),
    never from hdr_len, which the kernel sets to the whole first packet on
    some forwarding paths (as wireguard-go notes).

    Anything that does not parse is dropped and counted in `stats.split_dropped`.
    """
    st = stats if stats is not None else _NOSTATS
    st.split_in += len(bufs)
    if arena is not None:
        arena.reset()
    if len(bufs) >= _VECTOR_MIN_CSUM:
        done = _csum_uniform(bufs, arena)
        if done is not None:
            st.split_csum_completed += len(done)
            return done
    out: list = []
    gso_jobs: list[tuple[int, tuple]] = []  # (position in out, job)
    csum_jobs: list[tuple[int, memoryview, int, int]] = []  # (position, pkt, start, offset)
    for buf in bufs:
        if type(buf) is memoryview and (buf.itemsize != 1 or buf.ndim != 1):
            try:
                buf = buf.cast("B")
            except (TypeError, ValueError):
                st.split_dropped += 1
                continue
        n = len(buf) - VNET_HDR_LEN
        if n < 0:
            st.split_dropped += 1
            continue
        if buf[1] == VIRTIO_NET_HDR_GSO_NONE:  # the common case, inline
            pkt = memoryview(buf)[VNET_HDR_LEN:]
            if not buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                st.split_passthrough += 1
                out.append(pkt)
                continue
            cstart, coff = _CSUM_FIELDS.unpack_from(buf, 6)
            if cstart + coff + 2 > n:
                st.split_dropped += 1
                continue
            st.split_csum_completed += 1
            if n - cstart <= _SCALAR_JOB_BYTES or (cstart | coff) & 1:
                # Small, or a checksum at an odd offset (never from the kernel).
                out.append(_csum_scalar(pkt, cstart, coff))
            else:
                csum_jobs.append((len(out), pkt, cstart, coff))
                out.append(None)
            continue
        try:
            job = _classify(buf, mtu, st)
        except Exception:  # noqa: BLE001 - garbage must never escape (defensive)
            job = None
        if job is None:
            st.split_dropped += 1
            continue
        st.split_gso += 1
        st.split_segments += job[5]
        if job[5] < _VECTOR_MIN_SEGMENTS:
            out.extend(_split_scalar(job))
        else:
            gso_jobs.append((len(out), job))
            out.append(None)
    if not gso_jobs and not csum_jobs:
        return out
    expand: dict[int, list[memoryview]] = {}
    for pos, job in gso_jobs:
        expand[pos] = _split_gso_np(job, arena)
    if len(csum_jobs) >= _VECTOR_MIN_CSUM:
        for pos, mv in zip(csum_jobs, _csum_vector(csum_jobs, arena), strict=True):
            out[pos[0]] = mv
    else:
        for pos, pkt, cstart, coff in csum_jobs:
            out[pos] = _csum_scalar(pkt, cstart, coff)
    if not expand:
        return out
    res: list[memoryview] = []
    last = 0
    for pos, segs in expand.items():
        res.extend(out[last:pos])
        res.extend(segs)
        last = pos + 1
    res.extend(out[last:])
    return res


def _classify(buf: Buffer, mtu: int, st: OffloadStats) -> tuple | None:
    """Parse one TUN read carrying a GSO packet: a job tuple, or None (drop)."""
    if len(buf) < VNET_HDR_LEN:
        return None
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_off = _VNET.unpack_from(buf)
    pkt = memoryview(buf)[VNET_HDR_LEN:]
    n = len(pkt)
    needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4):
        return None
    if gso_size == 0 or n < 20:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if gso == VIRTIO_NET_HDR_GSO_TCPV6:
            return None
        l4 = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        if l4 < 20 or n < l4 or (_H.unpack_from(pkt, 6)[0] & 0x3FFF):  # fragments
            return None
        addr = _sum_mod(pkt[12:20])
        id0 = _H.unpack_from(pkt, 4)[0]
    elif version == 6:
        if gso == VIRTIO_NET_HDR_GSO_TCPV4 or n < 40:
            return None
        # Extension headers: trust csum_start (the kernel's transport offset).
        l4 = csum_start if needs_csum else 40
        proto = pkt[6] if l4 == 40 else (_PROTO_UDP if gso == VIRTIO_NET_HDR_GSO_UDP_L4 else 6)
        if l4 < 40 or l4 & 3:  # extension headers come in multiples of 8 bytes
            return None
        addr = _sum_mod(pkt[8:40])
        id0 = 0
    else:
        return None
    if needs_csum and csum_start != l4:
        return None
    if gso == VIRTIO_NET_HDR_GSO_UDP_L4:
        if proto != _PROTO_UDP or (needs_csum and csum_off != UDP_CSUM_OFFSET):
            return None
        hlen = l4 + 8
        seg = gso_size
        if n - hlen > 0 and hlen + min(seg, n - hlen) > mtu:
            st.split_too_big += 1
            return None
        kind = _K_UDP6 if version == 6 else _K_UDP4
        seq0 = 0
        csum_off = UDP_CSUM_OFFSET
    else:
        if proto != _PROTO_TCP or (needs_csum and csum_off != TCP_CSUM_OFFSET):
            return None
        if n < l4 + 20:
            return None
        doff = (pkt[l4 + 12] >> 4) * 4
        if doff < 20:
            return None
        hlen = l4 + doff
        seg = min(gso_size, mtu - hlen)
        if seg <= 0:
            return None
        kind = _K_TCP6 if version == 6 else _K_TCP4
        seq0 = _I.unpack_from(pkt, l4 + 4)[0]
        csum_off = TCP_CSUM_OFFSET
    plen = n - hlen
    if plen <= 0 or hlen > 0xFFFF:
        return None
    nseg = -(-plen // seg)
    seed = (addr + proto) % _M
    return (pkt, kind, l4, hlen, seg, nseg, plen, csum_off, seed, id0, seq0)


def _csum_scalar(pkt: memoryview, cstart: int, coff: int) -> memoryview:
    """Complete the checksum of one NEEDS_CSUM packet (no GSO), pure Python."""
    cs = cstart + coff
    b = bytearray(pkt)
    seed = (b[cs] << 8 | b[cs + 1]) % _M
    b[cs : cs + 2] = b"\0\0"
    _H.pack_into(b, cs, _l4_csum((seed + _sum_mod(memoryview(b)[cstart:])) % _M))
    return memoryview(b)


def _split_scalar(job: tuple) -> list[memoryview]:
    """One small super-packet, pure Python (big-integer checksums)."""
    pkt, kind, l4, hlen, seg, nseg, plen, csum_off, seed, id0, seq0 = job
    cs = l4 + csum_off
    v4 = kind in (_K_TCP4, _K_UDP4)
    tcp = kind in (_K_TCP4, _K_TCP6)
    hdr = bytes(pkt[:hlen])
    out = []
    for i in range(nseg):
        start = hlen + i * seg
        b = bytearray(hdr)
        b += pkt[start : min(start + seg, hlen + plen)]
        total = len(b)
        if v4:
            _H.pack_into(b, 2, total)
            _H.pack_into(b, 4, (id0 + i) & 0xFFFF)
            b[10:12] = b"\0\0"
            _H.pack_into(b, 10, _ip_csum(_sum_mod(memoryview(b)[:l4])))
        else:
            _H.pack_into(b, 4, total - 40)
        if tcp:
            _I.pack_into(b, l4 + 4, (seq0 + i * seg) & 0xFFFFFFFF)
            if i != nseg - 1:
                b[l4 + 13] &= ~(_FIN | _PSH) & 0xFF
            if i:
                b[l4 + 13] &= ~_CWR & 0xFF
        else:
            _H.pack_into(b, l4 + 4, total - l4)
        b[cs : cs + 2] = b"\0\0"
        r = (seed + total - l4 + _sum_mod(memoryview(b)[l4:])) % _M
        _H.pack_into(b, cs, _l4_csum(r))
        out.append(memoryview(b))
    return out


_ARANGE = np.arange(1 << 16, dtype=np.int64)


def _split_gso_np(job: tuple, arena: Arena | None = None) -> list[memoryview]:
    """One super-packet, vectorized: segment i is row i of an (n, stride) array.

    The header template is prepared once in Python (lengths of a full segment,
    checksums zeroed); numpy broadcasts it into every row, copies the payload
    as one reshape, writes the per-row sequence numbers and IPv4 IDs through
    big-endian views and sums every row's transport words in one call.  The
    last, shorter segment is then fixed up in Python.
    """
    pkt, kind, l4, hlen, seg, n, plen, csoff, seed, id0, seq0 = job
    v4 = kind in (_K_TCP4, _K_UDP4)
    tcp = kind in (_K_TCP4, _K_TCP6)
    full = n - 1
    seglen = hlen + seg
    lastpay = plen - full * seg
    lastlen = hlen + lastpay
    stride = (seglen + 3) & ~3  # rows start 4-aligned: u16 and u32 views line up
    cs = l4 + csoff
    hdr = bytearray(pkt[:hlen])
    hdr[cs : cs + 2] = b"\0\0"
    if v4:
        _H.pack_into(hdr, 2, seglen)
        hdr[4:6] = b"\0\0"
        hdr[10:12] = b"\0\0"
        ipbase = _sum_mod(memoryview(hdr)[:l4])  # every row's IPv4 header but the ID
    else:
        _H.pack_into(hdr, 4, seglen - 40)
    if tcp:
        fl = hdr[l4 + 13]
        first_fl = fl & ~(_FIN | _PSH) & 0xFF
        mid_fl = first_fl & ~_CWR & 0xFF
        last_fl = fl & ~_CWR & 0xFF if full else fl
        hdr[l4 + 13] = mid_fl
    else:
        _H.pack_into(hdr, l4 + 4, seglen - l4)

    flat, mv = _alloc(arena, n * stride)
    rows = flat.reshape(n, stride)
    src = np.frombuffer(pkt, np.uint8)
    rows[:, :hlen] = np.frombuffer(hdr, np.uint8)
    if full:
        rows[:full, hlen:seglen] = src[hlen : hlen + full * seg].reshape(full, seg)
        if stride != seglen:
            rows[:full, seglen:] = 0
    rows[full, hlen:lastlen] = src[hlen + full * seg :]
    rows[full, lastlen:] = 0
    be16 = flat.view(">u2").reshape(n, stride >> 1)
    if tcp:
        seqs = (_ARANGE[:n] * seg + seq0) & 0xFFFFFFFF
        flat.view(">u4").reshape(n, stride >> 2)[:, (l4 + 4) >> 2] = seqs
        if fl != mid_fl:
            rows[0, l4 + 13] = first_fl
        if fl != mid_fl or last_fl != mid_fl:
            rows[full, l4 + 13] = last_fl
    else:
        be16[full, (l4 + 4) >> 1] = lastlen - l4
    if v4:
        c0 = (ipbase + id0) % _M
        if id0 + n <= 0x10000 and c0 > 0 and c0 + n <= _M:
            # No wrap of the ID nor of the residue: row i's header checksum is
            # 0xffff - c0 - i (0 exactly when the residue is 0), so both
            # columns are plain (reversed) slices of a constant range.
            be16[:, 2] = _ARANGE[id0 : id0 + n]
            be16[:, 5] = _ARANGE[_M - c0 - n + 1 : _M - c0 + 1][::-1]
        else:
            ids = (_ARANGE[:n] + id0) & 0xFFFF
            be16[:, 2] = ids
            ipr = (ids + ipbase) % _M
            be16[:, 5] = np.where(ipr != 0, _M - ipr, 0)
    # Little-endian word sums (a byte-swapped big-endian sum: x256 modulo 0xffff).
    sums = flat.view(np.uint16).reshape(n, stride >> 1)[:, l4 >> 1 :].sum(axis=1, dtype=np.uint32)
    be16[:, cs >> 1] = _M - (sums % _M * 256 + (seed + seglen - l4)) % _M
    if lastlen != seglen:
        # The last row's sum already holds its own header; only the pseudo-header
        # length (and, for IPv4, the total length) differ from a full row.
        r = (int(sums[full]) % _M * 256 + seed + lastlen - l4) % _M
        be16[full, cs >> 1] = _l4_csum(r)
        if v4:
            be16[full, 1] = lastlen
            rf = (ipbase + ((id0 + full) & 0xFFFF)) % _M
            be16[full, 5] = _ip_csum((rf - seglen + lastlen) % _M)
        else:
            be16[full, 2] = lastlen - 40
    out = [mv[o : o + seglen] for o in range(0, full * stride, stride)]
    out.append(mv[full * stride : full * stride + lastlen])
    return out


class UniformBatch(Sequence[memoryview]):
    """What `split_gso_batch` returns for the usual batch of one UDP flow: equal
    even-length reads with one virtio-net header, NEEDS_CSUM without GSO.

    It reads as the list of finished packets, made on first use (one copy into
    the arena, the checksums as one 2D numpy reduction; valid as long as views
    from the arena are).  A caller that copies the packets anyway (into UMEM
    frames) calls `fill` instead: the checksums are completed on its copy, and the
    list, with its copy and its views, is never made.
    """

    def __init__(self, rows: np.ndarray, cstart: int, coff: int, arena: Arena | None) -> None:
        self.rows = rows  # (k, VNET_HDR_LEN + n), read-only: the reads as they came
        self.n = rows.shape[1] - VNET_HDR_LEN  # bytes per packet
        self._cstart, self._coff = cstart, coff
        self._arena = arena
        self._packets: list[memoryview] | None = None

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):  # type: ignore[override]
        return self.packets()[i]

    def __iter__(self):  # type: ignore[override]
        return iter(self.packets())

    def ipv4_destination(self) -> memoryview | None:
        """The first packet (its checksum not completed: for lookups by header) if
        every packet is IPv4 to one destination address, else None."""
        h = self.rows[:, VNET_HDR_LEN : VNET_HDR_LEN + 20]
        if (h[:, 0] >> 4 != 4).any() or not (h[:, 16:] == h[0, 16:]).all():
            return None
        return memoryview(h[0])

    def fill(self, out: np.ndarray, at: int) -> None:
        """Write the finished packets into `out[:, at : at + n]`: `out` is a C-contiguous
        uint8 array of len(self) rows of even length, `at` is even."""
        n, cstart = self.n, self._cstart
        out[:, at : at + n] = self.rows[:, VNET_HDR_LEN:]
        words = out.view(np.uint16)
        sums = words[:, (at + cstart) >> 1 : (at + n) >> 1].sum(axis=1, dtype=np.uint32)
        # Little-endian sums, hence x256; the kernel's partial sum in the field is summed in.
        sums %= _M
        sums *= 256
        sums %= _M
        out.view(">u2")[:, (at + cstart + self._coff) >> 1] = _M - sums

    def packets(self) -> list[memoryview]:
        if self._packets is None:
            k, n = len(self), self.n
            flat, mv = _alloc(self._arena, k * n)
            self.fill(flat.reshape(k, n), 0)
            self._packets = list(map(mv.__getitem__, map(slice, range(0, k * n, n),
                                                        range(n, k * n + 1, n))))
        return self._packets


def _csum_uniform(bufs: Sequence[Buffer], arena: Arena | None) -> UniformBatch | None:
    """`split_gso_batch` for the usual batch of a UDP flow (see `UniformBatch`), or None
    for any other: the checksum region big and at even offsets.  No per-packet Python."""
    k = len(bufs)
    size = len(bufs[0])
    if (size & 1 or size < VNET_HDR_LEN or list(map(len, bufs)).count(size) != k
            or set(map(type, bufs)) != {bytes}):  # what TUN reads give; views: general path
        return None
    heads = set(map(_VNET.unpack_from, bufs))
    if len(heads) != 1:
        return None
    flags, gso_type, _, _, cstart, coff = heads.pop()
    n = size - VNET_HDR_LEN
    if (not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_type != VIRTIO_NET_HDR_GSO_NONE
            or (cstart | coff) & 1 or cstart + coff + 2 > n or n - cstart <= _SCALAR_JOB_BYTES):
        return None
    return UniformBatch(np.frombuffer(b"".join(bufs), np.uint8).reshape(k, size), cstart, coff,
                        arena)


def _csum_vector(jobs: list[tuple[int, memoryview, int, int]], arena: Arena | None) -> list:
    """Big NEEDS_CSUM packets (no GSO) of one batch: one join, one reduceat."""
    parts: list[Buffer] = []
    meta: list[int] = []  # per packet: offset, csum_start, checksum field position
    lens: list[int] = []
    pos = 0
    for _, pkt, cstart, coff in jobs:
        n = len(pkt)
        parts.append(pkt)
        meta += (pos, pos + cstart, pos + cstart + coff)
        lens.append(n)
        pos += n
        if n & 1:
            parts.append(b"\0")
            pos += 1
    flat, mv = _alloc(arena, pos)
    flat[:] = np.frombuffer(b"".join(parts), np.uint8)
    m = np.array(meta, np.int64) >> 1  # all even: in 16-bit words
    cs = m[2::3]
    be = flat.view(">u2")
    seed = be[cs] % _M  # the kernel's partial sum, summed in like the rest
    be[cs] = 0
    # sums[2k+1]: packet k's words from csum_start to the next packet (+ zero pad).
    idx = m.reshape(-1, 3)[:, :2].ravel()  # [start, csum_start] per packet
    sums = np.add.reduceat(flat.view(np.uint16), idx, dtype=np.uint32)[1::2]
    be[cs] = _M - (sums % _M * 256 + seed) % _M
    offs = meta[0::3]
    return [mv[o : o + n] for o, n in zip(offs, lens, strict=True)]


# --------------------------------------------------------------- coalesce (write)


class _Group:
    """Consecutive packets of one TCP or UDP flow being merged (indices into packets)."""

    __slots__ = ("idx", "v6", "udp", "hlen", "gso", "total", "next_seq", "sig", "last_id")

    def __init__(
        self,
        i: int,
        v6: bool,
        hlen: int,
        payload: int,
        seq: int,
        sig: tuple,
        ipid: int,
        udp: bool = False,
    ) -> None:
        self.idx = [i]
        self.v6 = v6
        self.udp = udp
        self.hlen = hlen
        self.gso = payload  # every segment but the last carries exactly this much
        self.total = hlen + payload  # IP packet length of the merged packet so far
        self.next_seq = (seq + payload) & 0xFFFFFFFF  # TCP only
        self.sig = sig  # header fields that must be equal along the run
        self.last_id = ipid


def coalesce(
    packets: Sequence[Buffer],
    *,
    udp: bool = False,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
    verify_checksums: bool = True,
    stats: OffloadStats | None = None,
) -> list[bytes]:
    """Merge the in-order TCP segments (and, with `udp`, UDP datagrams) of a batch
    into super-packets for an IFF_VNET_HDR TUN.

    `packets` are decrypted IP packets in arrival order.  Returns buffers to
    write to the TUN, each starting with a virtio-net header:
      - merged TCP: gso_type TCPV4/TCPV6, flags NEEDS_CSUM, hdr_len = IP + TCP
        header length, gso_size = payload of the first segment, csum_start =
        IP header length, csum_offset = 16; the IP and TCP headers are those of
        the first segment with the IPv4 total length and header checksum or
        the IPv6 payload length fixed, PSH taken from the last segment, and the
        TCP checksum field holding the folded pseudo-header sum (not
        complemented), i.e. CHECKSUM_PARTIAL;
      - merged UDP (only with `udp=True`, i.e. when the TUN accepted
        USO4|USO6): gso_type UDP_L4, flags NEEDS_CSUM, hdr_len = IP header +
        8, gso_size = payload of the first datagram, csum_start = IP header
        length, csum_offset = 6; the headers of the first datagram with the IP
        lengths (and IPv4 header checksum) fixed, the UDP length = 8 + total
        payload, and the UDP checksum field holding the folded pseudo-header
        sum over that length (the kernel's __udp_gso_segment swaps the length
        for each segment's own);
      - everything else: an all-zero header and the packet unchanged.

    TCP segments p and q (q right after p in the same flow's current run)
    merge when: same IP version, addresses and ports; IPv4 without options or
    fragments, same TOS, TTL and DF/reserved bits, and consecutive IDs unless
    DF is set; IPv6 with TCP as next header and the same version/class/flow
    label word and hop limit; the IP length fields match the buffer; flags
    exactly ACK (or ACK|PSH, which ends the run; reserved and AE bits clear,
    so no SYN, FIN, RST, URG, ECE or CWR); q's sequence number follows p's
    payload; same ACK number, window, TCP header length and option bytes
    (timestamps included: the kernel's GRO does the same, and a TSO burst
    shares one TSval); a payload of 1..gso_size bytes, a shorter one ending
    the run; at most `max_segments` segments and 65535 bytes of IP packet.

    UDP datagrams merge under the same IP rules (IPv6: UDP as next header, no
    extension headers) when the UDP length matches the buffer and the payload
    is 1..gso_size bytes, a shorter one ending the run; at most
    min(`max_segments`, 64) datagrams and 65535 bytes of IP packet.  IPv6
    datagrams with checksum 0 (invalid) are never merged.

    With `verify_checksums`, the transport (and IPv4 header) checksum of every
    packet that would be merged is verified first (an IPv4 UDP checksum of 0
    means "none" and passes) and a failing one is written alone (one numpy
    pass over the batch, about 0.5 us per packet; `False` skips it).

    Order: a run is emitted at the position of its first packet, so packets of
    one flow keep their order (a packet that cannot join breaks the run; a
    run never takes a packet from before a non-joinable packet of its flow;
    an IPv4 fragment breaks every run of its protocol between its addresses) and other
    flows' packets are only overtaken by the later packets of a run.
    Never raises on garbage; never drops.
    """
    st = stats if stats is not None else _NOSTATS
    st.coalesce_in += len(packets)
    max_segments = max(1, max_segments)
    max_udp = min(max_segments, UDP_MAX_SEGMENTS)
    plan = _plan_udp4_flow(packets, max_udp) if udp and len(packets) > 1 else None
    slots, groups = plan if plan is not None else _plan(packets, udp, max_segments, max_udp, st)

    if verify_checksums:
        merged = [g for g in groups if len(g.idx) > 1]
        if merged:
            # A flow plan's runs are consecutive: its merged ones are packets[:m] unless
            # a run of one (a full-size datagram over 32 KB, the shorter last one
            # joining the final run) lies in between, which is not a candidate.
            m = merged[-1].idx[-1] + 1
            if (plan is not None and m >= _VECTOR_MIN_VERIFY and not len(packets[0]) & 1
                    and sum(len(g.idx) for g in merged) == m):
                bad = _bad_udp4_flow(packets, m)
            else:
                bad = _bad_checksums(packets, merged)
            if bad:
                st.coalesce_bad_csum += len(bad)
                slots = _split_bad(slots, bad, packets)

    out: list[bytes] = []
    for s in slots:
        if isinstance(s, _Group):
            if len(s.idx) == 1:
                out.append(VNET_ZERO + packets[s.idx[0]])
            else:
                out.append(_build_super(s, packets))
                st.coalesce_super += 1
                st.coalesce_merged += len(s.idx)
                if s.udp:
                    st.coalesce_udp_super += 1
                    st.coalesce_udp_merged += len(s.idx)
        else:
            out.append(VNET_ZERO + s)
    st.coalesce_out += len(out)
    return out


def _plan_udp4_flow(packets: Sequence[Buffer], max_udp: int) -> tuple[list, list[_Group]] | None:
    """`_plan` for the usual UDP batch, in C-level passes: one IPv4 flow (no options,
    no fragments, DF set, equal TOS and TTL) of equal-size datagrams, the last
    perhaps shorter, with IP and UDP lengths matching the buffers.  Runs of
    `max_udp` datagrams (fewer if 64 KB is reached), exactly as `_plan` cuts them:
    a shorter last datagram joins the last run whenever it fits there by count and
    by bytes (even if a full-size one would not), else goes alone.  None for any
    other batch."""
    n = len(packets)
    lens = list(map(len, packets))
    first = lens[0]
    rows = n if lens[-1] == first else n - 1  # the equal-size ones
    if (first <= 28 or first > MAX_IP_PACKET or lens.count(first) != rows
            or not 28 < lens[-1] <= first):
        return None
    heads = set(map(_V4UDP_FLOW.unpack_from, packets[:rows] if rows < n else packets))
    if len(heads) != 1:
        return None
    w0, f, tail = heads.pop()
    if (w0 >> 24 != 0x45 or w0 & 0xFFFF != first or f & 0x7FFF00FF != 0x40000000 | _PROTO_UDP
            or (tail[12] << 8 | tail[13]) != first - 20):
        return None
    if rows < n:  # a shorter last one: the same but for its lengths
        last = lens[-1]
        w0l, fl, taill = _V4UDP_FLOW.unpack_from(packets[-1])
        if (w0l != (w0 & 0xFFFF0000 | last) or fl != f or taill[:12] != tail[:12]
                or (taill[12] << 8 | taill[13]) != last - 20):
            return None
    # Runs of the equal-size ones: `cap` each, by count or by the 64 KB of a run.
    seg = first - 28
    cap = min(max_udp, (MAX_IP_PACKET - 28) // seg)
    sig = (w0 >> 16, f)
    groups: list[_Group] = []
    for a in range(0, rows, cap):
        b = min(a + cap, rows)
        g = _Group(a, False, 28, seg, 0, sig, 0, True)
        g.idx = list(range(a, b))
        g.total = 28 + (b - a) * seg
        groups.append(g)
    if rows < n:
        # The shorter last one ends the last run if that has room for it: by count,
        # and by bytes even where one more full-size datagram would not fit.
        tail = lens[-1] - 28
        g = groups[-1]
        if len(g.idx) < max_udp and g.total + tail <= MAX_IP_PACKET:
            g.idx.append(n - 1)
            g.total += tail
        else:
            groups.append(_Group(n - 1, False, 28, tail, 0, sig, 0, True))
    return list(groups), groups


def _plan(packets: Sequence[Buffer], udp: bool, max_segments: int, max_udp: int,
          st: OffloadStats) -> tuple[list, list[_Group]]:
    """The batch as slots in output order (a _Group to merge, or a packet written
    alone) and the groups among them; the rules are `coalesce`'s."""
    slots: list = []  # _Group or a raw packet
    # Keys: TCPv4 int, TCPv6 (bytes, int), UDPv4 (int, int), UDPv6 (bytes, int, 17).
    open_groups: dict = {}
    groups: list[_Group] = []
    v4s, v6s = _V4TCP.unpack_from, _V6TCP.unpack_from
    u4s, u6s = _V4UDP.unpack_from, _V6UDP.unpack_from
    for i, p in enumerate(packets):
        n = len(p)
        if n < 28 or n > MAX_IP_PACKET:
            slots.append(p)
            continue
        b0 = p[0]
        if b0 == 0x45:
            proto = p[9]
            if proto == _PROTO_UDP and udp:
                (vtos, tot, ipid, fttp, addrs, ports, ulen, ucsum) = u4s(p)
                ukey: tuple = (addrs, ports)
                if fttp & 0x3FFF0000:
                    # A fragment: ports unknown (or payload) for all but the first,
                    # so end every UDP run between these addresses.
                    for k in [k for k in open_groups if type(k) is tuple and k[0] == addrs]:
                        del open_groups[k]
                    slots.append(p)
                    continue
                if tot != n or ulen != n - 20 or n == 28:
                    open_groups.pop(ukey, None)
                    slots.append(p)
                    continue
                usig: tuple = (vtos, fttp)  # TOS, DF/reserved bits, TTL
                udf = fttp & 0x40000000
                ul4 = 20
            elif proto != _PROTO_TCP or n < 40:
                slots.append(p)
                continue
            else:
                (vtos, tot, ipid, fttp, addrs, ports, seq, ack, dfl, win) = v4s(p)
                key = (addrs << 32) | ports
                hlen = 20 + ((dfl >> 12) << 2)
                # fttp: flags/fragment offset, TTL, protocol; dfl: data offset, flags.
                if fttp & 0x3FFF0000:
                    # A fragment: as for UDP, end every TCP run between these addresses.
                    for k in [k for k in open_groups if type(k) is int and k >> 32 == addrs]:
                        del open_groups[k]
                    slots.append(p)
                    continue
                if (
                    tot != n
                    or dfl < 0x5000
                    or n <= hlen
                    or (dfl & 0x0FFF != _ACK and dfl & 0x0FFF != _ACK | _PSH)
                ):
                    open_groups.pop(key, None)
                    slots.append(p)
                    continue
                # Must match along a run: TOS, DF/reserved bits, TTL, ACK, window,
                # TCP header length and options (compared as bytes below).
                sig = (vtos, fttp, ack, win, p[40:hlen])
                df = fttp & 0x40000000
                l4 = 20
        elif b0 >> 4 == 6:
            if n < 48:
                slots.append(p)
                continue
            proto = p[6]
            if proto == _PROTO_UDP and udp:
                (word0, plen, nh_hl, addrs6, ports, ulen, ucsum) = u6s(p)
                ukey = (addrs6, ports, _PROTO_UDP)
                if plen != n - 40 or ulen != n - 40 or n == 48 or not ucsum:
                    if not ucsum and plen == ulen == n - 40:
                        st.coalesce_bad_csum += 1  # 0 is invalid over IPv6
                    open_groups.pop(ukey, None)
                    slots.append(p)
                    continue
                usig = (word0, nh_hl)  # version, class, flow label, hop limit
                udf = True
                ipid = 0
                ul4 = 40
            elif proto != _PROTO_TCP or n < 60:
                slots.append(p)
                continue
            else:
                (word0, plen, nh_hl, addrs6, ports, seq, ack, dfl, win) = v6s(p)
                key = (addrs6, ports)
                hlen = 40 + ((dfl >> 12) << 2)
                if (
                    plen != n - 40
                    or dfl < 0x5000
                    or n <= hlen
                    or (dfl & 0x0FFF != _ACK and dfl & 0x0FFF != _ACK | _PSH)
                ):
                    open_groups.pop(key, None)
                    slots.append(p)
                    continue
                # Version, traffic class, flow label, hop limit, ACK, window, options.
                sig = (word0, nh_hl, ack, win, p[60:hlen])
                df = True
                ipid = 0
                l4 = 40
        else:
            slots.append(p)
            continue
        if proto == _PROTO_UDP:
            payload = n - ul4 - 8
            g = open_groups.get(ukey)
            if (
                g is not None
                and payload <= g.gso
                and g.sig == usig
                and g.total + payload <= MAX_IP_PACKET
                and len(g.idx) < max_udp
                and (udf or ipid == (g.last_id + 1) & 0xFFFF)
            ):
                g.idx.append(i)
                g.total += payload
                g.last_id = ipid
                if payload < g.gso:
                    del open_groups[ukey]
                continue
            g = _Group(i, ul4 == 40, ul4 + 8, payload, 0, usig, ipid, True)
            slots.append(g)
            groups.append(g)
            open_groups[ukey] = g
            continue
        payload = n - hlen
        g = open_groups.get(key)
        if (
            g is not None
            and g.next_seq == seq
            and payload <= g.gso
            and g.sig == sig
            and g.total + payload <= MAX_IP_PACKET
            and len(g.idx) < max_segments
            and (df or ipid == (g.last_id + 1) & 0xFFFF)
        ):
            g.idx.append(i)
            g.total += payload
            g.next_seq = (seq + payload) & 0xFFFFFFFF
            g.last_id = ipid
            if payload < g.gso or dfl & _PSH:
                del open_groups[key]
            continue
        g = _Group(i, l4 == 40, hlen, payload, seq, sig, ipid)
        slots.append(g)
        groups.append(g)
        if dfl & _PSH:
            open_groups.pop(key, None)
        else:
            open_groups[key] = g
    return slots, groups


def _bad_checksums(packets: Sequence[Buffer], groups: list[_Group]) -> set[int]:
    """Indices of the groups' packets whose TCP/UDP or IPv4 header checksum is wrong.

    An IPv4 UDP checksum of 0 ("none") is not checked; the IPv4 header still is.
    Few candidates: big-integer sums in Python.  Otherwise one numpy reduceat
    over all candidates joined (two regions each: the first 20 bytes, the rest),
    the per-packet arithmetic in Python: numpy's per-call cost, not the bytes,
    dominates at batch sizes of a few to 64 packets.
    """
    bad: set[int] = set()
    ncand = sum(len(g.idx) for g in groups)
    if ncand < _VECTOR_MIN_VERIFY:
        for g in groups:
            v6 = g.v6
            l4 = 40 if v6 else 20
            base = (_PROTO_UDP if g.udp else _PROTO_TCP) - l4 + _addr_sum(packets[g.idx[0]], v6)
            v4udp = g.udp and not v6
            for j in g.idx:
                p = packets[j]
                r = (base + len(p) + _sum_mod(p[l4:])) % _M
                if r and v4udp and not (p[26] or p[27]):
                    r = 0
                if r or (not v6 and _sum_mod(p[:20])):
                    bad.add(j)
        return bad
    # Every packet at an even offset (odd ones padded); two regions per packet, in
    # 16-bit words: the IP header [start, transport) and [transport, next start).
    parts: list[Buffer] = []
    idx: list[int] = []
    pos = 0
    for g in groups:
        hw = 20 if g.v6 else 10
        for j in g.idx:
            p = packets[j]
            n = len(p)
            parts.append(p)
            idx.append(pos >> 1)
            idx.append((pos >> 1) + hw)
            pos += n
            if n & 1:
                parts.append(b"\0")
                pos += 1
    w = np.frombuffer(b"".join(parts), np.uint16)
    # Little-endian word sums; x 256 modulo 0xffff makes them big-endian sums.
    sums = np.add.reduceat(w, idx, dtype=np.uint32).tolist()
    k = 0
    for g in groups:
        v6 = g.v6
        # Pseudo-header: addresses (equal along a group) + protocol + L4 length.
        base = (_PROTO_UDP if g.udp else _PROTO_TCP) + _addr_sum(packets[g.idx[0]], v6)
        v4udp = g.udp and not v6
        for j in g.idx:
            head, rest = sums[k], sums[k + 1]
            k += 2
            p = packets[j]
            if v6:
                r = (rest * 256 + base + len(p) - 40) % _M
            elif head % _M:  # IPv4 header checksum
                r = 1
            else:
                r = (rest * 256 + base + len(p) - 20) % _M
                if r and v4udp and not (p[26] or p[27]):
                    r = 0
            if r:
                bad.add(j)
    return bad


def _bad_udp4_flow(packets: Sequence[Buffer], m: int) -> set[int]:
    """`_bad_checksums` for packets[:m] of a `_plan_udp4_flow` batch (one IPv4 UDP
    flow, equal even lengths but perhaps the last): the equal-length ones as one 2D
    array, a few numpy calls in all, the last one in Python if shorter."""
    first = len(packets[0])
    rows = m if len(packets[m - 1]) == first else m - 1
    # Valid: the IPv4 header words sum to 0, and the UDP words (read little-endian,
    # hence the x256) plus the pseudo-header to 0, unless the UDP checksum is 0.
    base = _PROTO_UDP - 20 + _addr_sum(packets[0], False)
    bad: set[int] = set()
    w = np.frombuffer(b"".join(packets[:rows]), np.uint16).reshape(rows, first >> 1)
    head = w[:, :10].sum(axis=1, dtype=np.uint32) % _M
    rest = w[:, 10:].sum(axis=1, dtype=np.uint32) % _M
    want = -(base + first) * 256 % _M  # the residue of `rest` that makes the sum 0
    flags = (head != 0) | ((rest != want) & (w[:, 13] != 0))
    if flags.any():
        bad.update(np.flatnonzero(flags).tolist())
    if rows < m:
        p = packets[m - 1]
        r = (base + len(p) + _sum_mod(p[20:])) % _M
        if (r and (p[26] or p[27])) or _sum_mod(p[:20]):
            bad.add(m - 1)
    return bad


def _split_bad(slots: list, bad: set[int], packets: Sequence[Buffer]) -> list:
    """Break groups at packets with bad checksums; those go out alone."""
    out: list = []
    for s in slots:
        if not isinstance(s, _Group) or not bad.intersection(s.idx):
            out.append(s)
            continue
        run: list[int] = []
        for j in [*s.idx, -1]:
            if j != -1 and j not in bad:
                run.append(j)
                continue
            if run:
                first = len(packets[run[0]]) - s.hlen
                g = _Group(run[0], s.v6, s.hlen, first, 0, s.sig, 0, s.udp)
                g.idx = run
                g.total = s.hlen + sum(len(packets[x]) - s.hlen for x in run)
                out.append(g)
                run = []
            if j != -1:
                out.append(packets[j])
    return out


def _build_super(g: _Group, packets: Sequence[Buffer]) -> bytes:
    first = packets[g.idx[0]]
    hlen = g.hlen
    hdr = bytearray(first[:hlen])
    total = g.total
    l4 = 40 if g.v6 else 20
    if g.v6:
        _H.pack_into(hdr, 4, total - 40)
    else:
        _H.pack_into(hdr, 2, total)
        hdr[10:12] = b"\0\0"
        _H.pack_into(hdr, 10, _ip_csum(_sum_mod(hdr[:20])))
    if g.udp:
        proto, coff = _PROTO_UDP, UDP_CSUM_OFFSET
        gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        _H.pack_into(hdr, l4 + 4, total - l4)
    else:
        proto, coff = _PROTO_TCP, TCP_CSUM_OFFSET
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if g.v6 else VIRTIO_NET_HDR_GSO_TCPV4
        hdr[l4 + 13] |= packets[g.idx[-1]][l4 + 13] & _PSH
    r = (_addr_sum(hdr, g.v6) + proto + total - l4) % _M
    _H.pack_into(hdr, l4 + coff, r or _M)
    vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hlen, g.gso, l4, coff)
    parts: list[Buffer] = [vnet, hdr]
    for j in g.idx:
        parts.append(memoryview(packets[j])[hlen:])
    return b"".join(parts)


# -------------------------------------------------------------------------- bench


def _bench_packet(v6: bool, payload: bytes, seq: int, flags: int = _ACK, ipid: int = 1) -> bytes:
    """A TCP/IP packet with a timestamp option and valid checksums (bench input)."""
    opts = b"\x01\x01\x08\x0a" + _I.pack(123456) + _I.pack(654321)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 40000, 5201, seq, 777, (32 // 4) << 4, flags, 501, 0, 0) + opts
    )
    if v6:
        ip = bytearray(
            struct.pack("!IHBB", 0x60000000, len(tcp) + len(payload), 6, 64)
            + bytes.fromhex("fd99" + "00" * 13 + "01")
            + bytes.fromhex("fd99" + "00" * 13 + "02")
        )
    else:
        ip = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                20 + len(tcp) + len(payload),
                ipid,
                0x4000,
                64,
                6,
                0,
                bytes([10, 99, 0, 2]),
                bytes([10, 99, 0, 1]),
            )
        )
        _H.pack_into(ip, 10, _ip_csum(_sum_mod(ip)))
    r = (_addr_sum(ip, v6) + 6 + len(tcp) + len(payload) + _sum_mod(bytes(tcp) + payload)) % _M
    _H.pack_into(tcp, 16, _l4_csum(r))
    return bytes(ip + tcp) + payload


def _bench_udp_packet(v6: bool, payload: bytes, ipid: int = 1) -> bytes:
    """A UDP/IP datagram (DF, iperf3-like ports) with valid checksums (bench input)."""
    udp = bytearray(struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0))
    if v6:
        ip = bytearray(
            struct.pack("!IHBB", 0x60000000, len(udp) + len(payload), _PROTO_UDP, 64)
            + bytes.fromhex("fd99" + "00" * 13 + "01")
            + bytes.fromhex("fd99" + "00" * 13 + "02")
        )
    else:
        ip = bytearray(
            struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(payload), ipid, 0x4000, 64, _PROTO_UDP, 0)
            + bytes([10, 99, 0, 2, 10, 99, 0, 1])
        )
        _H.pack_into(ip, 10, _ip_csum(_sum_mod(ip)))
    r = (_addr_sum(ip, v6) + _PROTO_UDP + len(udp) + len(payload)) % _M
    _H.pack_into(udp, 6, _l4_csum((r + _sum_mod(bytes(udp) + payload)) % _M))
    return bytes(ip + udp) + payload


def _timeit(fn: Callable[[], object], repeat: int, rounds: int = 5) -> float:
    """Best of `rounds` means over `repeat` calls, in seconds per call (the
    minimum filters out other load on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def bench(repeat: int = 100) -> dict[str, float]:
    """Microbenchmarks: µs per segment for split, µs per packet for coalesce and
    for completing NEEDS_CSUM checksums."""
    res: dict[str, float] = {}
    mss = 1420 - 20 - 32
    payload = bytes(range(256)) * 256
    for v6 in (False, True):
        sup = bytearray(_bench_packet(v6, payload[: 65535 - 72], 1000))
        l4 = 40 if v6 else 20
        r = (_addr_sum(sup, v6) + 6 + len(sup) - l4) % _M
        _H.pack_into(sup, l4 + 16, r)  # partial sum, as the kernel leaves it
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
        buf = pack_vnet_hdr(1, gso_type, l4 + 32, mss, l4, 16) + bytes(sup)
        fam = "v6" if v6 else "v4"
        arena = Arena(1 << 20)
        for batch, ar in ((1, None), (8, None), (8, arena)):
            bufs = [buf] * batch
            nseg = len(split_gso_batch(bufs, 1420))
            dt = _timeit(lambda b=bufs, a=ar: split_gso_batch(b, 1420, arena=a), repeat)
            name = f"split_{fam}_64k_x{batch}{'_arena' if ar else ''}_us_per_segment"
            res[name] = dt / nseg * 1e6
        segs = [bytes(s) for s in split_gso_batch([buf] * 2, 1420)][:64]  # 2 runs of 1 flow
        for verify in (True, False):
            dt = _timeit(lambda s=segs, v=verify: coalesce(s, verify_checksums=v), repeat)
            res[f"coalesce_{fam}_64pkt_verify={verify}_us_per_packet"] = dt / 64 * 1e6
    # UDP: 64 datagrams of 1372 bytes (iperf3 -u -l 1372) of one flow, merged into
    # USO super-packets (2 here: 47 fit in 64 KB) or each given a zero header.
    for v6 in (False, True):
        fam = "v6" if v6 else "v4"
        dg = [_bench_udp_packet(v6, payload[i : i + 1372], i + 1) for i in range(64)]
        for udp in (True, False):
            dt = _timeit(lambda d=dg, u=udp: coalesce(d, udp=u), repeat)
            res[f"coalesce_udp_{fam}_64x1372_udp={udp}_us_per_packet"] = dt / 64 * 1e6
    ack = pack_vnet_hdr(1, 0, 0, 0, 20, 16) + _bench_packet(False, b"", 1)
    udp = bytearray(_bench_packet(False, payload[:1368], 1))
    udp[9] = _PROTO_UDP
    udp = pack_vnet_hdr(1, 0, 0, 0, 20, 6) + bytes(udp)
    for name, bufs in (
        ("ack_x1", [ack]),
        ("ack_x32", [ack] * 32),
        ("1400B_x1", [udp]),
        ("1400B_x32", [udp] * 32),
    ):
        dt = _timeit(lambda b=bufs: split_gso_batch(b, 1420), repeat * 2)
        res[f"needs_csum_{name}_us_per_packet"] = dt / len(bufs) * 1e6
    return res


def main() -> int:
    for k, v in bench().items():
        print(f"{k:48s} {v:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
