"""AF_XDP sockets from pure Python: UMEM, fill/completion/RX/TX rings as numpy views.

Why no binding library: there is no maintained Python binding for AF_XDP or
libxdp that fits here.  `pip index versions` finds nothing named pyxdp, xdp,
libxdp or xsk; the closest PyPI names are `pysdn` (a CFFI glue experiment
last released in 2019) and `xdp-test-harness` (a test harness for XDP
programs, not a socket API).  libxdp itself is a C library whose xsk.h ring
helpers are `static inline`, so they cannot be called through ctypes anyway.
Compiling an extension of our own would add a toolchain step to every
machine.  The AF_XDP user API is small: socket(), a few setsockopt/getsockopt
calls, bind() and four mmap'ed rings.  So this module speaks it directly with
`ctypes` (only for bind(), whose `struct sockaddr_xdp` Python's socket.bind
cannot express), `mmap` and `numpy`.

Layout (kernel 6.x UAPI, linux/if_xdp.h), all little-endian x86-64:

- ``struct xdp_umem_reg {u64 addr; u64 len; u32 chunk_size; u32 headroom;
  u32 flags; u32 tx_metadata_len;}`` (32 bytes, XDP_UMEM_REG=4).  The v2
  layout without tx_metadata_len is also 32 bytes because of padding; since
  6.11 the kernel only reads tx_metadata_len with flag
  XDP_UMEM_TX_METADATA_LEN, so zero is safe on every 6.x kernel.
- ``struct sockaddr_xdp {u16 family; u16 flags; u32 ifindex; u32 queue_id;
  u32 shared_umem_fd;}`` (16 bytes).
- ``struct xdp_mmap_offsets {struct xdp_ring_offset rx, tx, fr, cr;}`` where
  ``xdp_ring_offset = {u64 producer, consumer, desc, flags}`` (128 bytes,
  XDP_MMAP_OFFSETS=1).  On 6.18 (x86-64) every ring reports producer 0,
  consumer 128, flags 196, descriptors 320: the kernel pads producer and
  consumer onto separate pairs of cache lines.  Always use what it reports.
- ``struct xdp_desc {u64 addr; u32 len; u32 options;}`` (16 bytes) in the RX and
  TX rings; plain u64 addresses in the fill and completion rings.
- ``struct xdp_statistics`` (6 x u64, XDP_STATISTICS=7).

Rings.  Each ring is a single-producer/single-consumer queue with free-running
u32 producer and consumer indices; slot = index & (size - 1).  This module
keeps libxdp's scheme: a cached copy of the other side's index, re-read only
when the cached value says the ring is empty (consumer) or full (producer).
Index words are read and written through ``memoryview(mm).cast('I')``, which
costs a few tens of ns, much less than numpy scalar access; descriptor
arrays are numpy views used for whole batches (slice copies, two slices when
a batch wraps around the end of the ring).

Memory ordering: descriptors are written before the producer index is
published, and a consumer index is only stored after the descriptors were
copied out.  CPython executes these stores in program order and x86-64 (TSO)
does not reorder store/store or load/load, so no explicit barrier is needed.
On a weakly ordered CPU (arm64) a release/acquire fence would be required,
which pure Python cannot emit; this module is for x86-64.

Modes.  Zero-copy needs driver support; veth, the lab's underlay, supports
only copy mode (the kernel copies each packet into or out of the UMEM).
``mode="auto"`` asks for zero-copy first and binds again in copy mode if the
driver refuses.  What copy mode needs (checked on 6.18):

- TX in copy mode only happens inside sendto()/poll() (the kernel's
  ``xsk_generic_xmit``); there is no asynchronous kernel consumer, so `kick`
  always calls sendto() in copy mode, whatever the TX ring's need_wakeup flag
  says, and loops until the kernel consumed everything that was submitted.
  Each sendto() sends at most `max_tx_budget` frames (32 by default) and
  returns EAGAIN when more remain; 6.18 accepts
  setsockopt(SOL_XDP, XDP_MAX_TX_SKB_BUDGET=9, n) for 32 <= n <= TX ring size.
- RX in copy mode runs in the kernel's receive path, so the fill ring never
  needs a wakeup; with zero-copy and need_wakeup the driver sets the fill
  ring's flag and `wakeup_rx` (a zero-length recvfrom) is called for it.

Observed on 6.18 with veth: a zero-copy bind fails with EOPNOTSUPP and the
same socket then binds in copy mode; the TX ring's need_wakeup flag is always
set and the fill ring's never; XDP_MAX_TX_SKB_BUDGET gives EACCES outside
[32, TX ring size] (and without a TX ring) and cannot be read back; a copy-mode
sendto() returns EAGAIN while frames remain after its budget, so 1000 frames
take 4 calls at budget 256 (32 calls at the default 32); a queue stays EBUSY
for about 20-30 ms after its socket was closed (deferred pool release), which
`XskSocket` retries; `ss --xdp` shows nothing (no CONFIG_XDP_SOCKETS_DIAG),
but /proc/net/protocols counts AF_XDP sockets per namespace.

Frames.  `Umem` has a simple allocator (a numpy stack of free frame
addresses).  RX frames come back from `rx_peek` with the address of the packet
data (chunk start + XDP_PACKET_HEADROOM + UMEM headroom in copy mode); the
allocator and the fill ring accept any address inside a chunk (aligned
mode masks it), so RX addresses can be recycled straight into the fill ring or
freed.  One UMEM can be shared by several sockets (XDP_SHARED_UMEM): sockets
on the same (device, queue) share its fill/completion rings, a socket on
another queue gets its own pair (kernel >= 5.10).

Small batches.  Up to `SMALL_BATCH` entries are moved with plain memoryview
element access, and come back as lists instead of arrays (`rx_peek`, `complete`,
`Umem.alloc`; `as_list` evens that out); `fill`, `tx_submit` and `Umem.free`
take lists of any length or arrays.  A numpy call
whose code has gone cold costs about 100 us on this VM after 10 ms of idle,
against about 13 us for a `struct` call, and a ping's every hop is cold; in
a hot loop both are a few us.  Batches above it keep the numpy paths.

Not covered: multi-buffer (XDP_USE_SG), unaligned chunks, TX metadata.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# ------------------------------------------------------------------ UAPI constants
AF_XDP = 44
SOL_XDP = 283

# setsockopt/getsockopt names
XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7
XDP_OPTIONS = 8
XDP_MAX_TX_SKB_BUDGET = 9  # 6.17+: frames per sendto() in copy mode (default 32)

# sockaddr_xdp.sxdp_flags
XDP_SHARED_UMEM = 1 << 0
XDP_COPY = 1 << 1
XDP_ZEROCOPY = 1 << 2
XDP_USE_NEED_WAKEUP = 1 << 3

XDP_RING_NEED_WAKEUP = 1 << 0  # ring flags word
XDP_OPTIONS_ZEROCOPY = 1 << 0  # getsockopt(XDP_OPTIONS)

# mmap page offsets of the rings
XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

XDP_PACKET_HEADROOM = 256  # the kernel's headroom in front of copy-mode RX data
TX_BATCH_SIZE = 32         # the kernel's default copy-mode TX budget per sendto()
ENOTSUPP = 524             # kernel-internal "not supported" that leaks out of some drivers

DEFAULT_FRAME_COUNT = 4096
DEFAULT_FRAME_SIZE = 2048
DEFAULT_RING_SIZE = 2048
DEFAULT_TX_BUDGET = 256

UMEM_REG = struct.Struct("=QQIIII")     # struct xdp_umem_reg (6.x), 32 bytes
MMAP_OFFSETS = struct.Struct("=16Q")    # struct xdp_mmap_offsets, 128 bytes
STATISTICS_FIELDS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                     "rx_fill_ring_empty_descs", "tx_ring_empty_descs")

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("options", "<u4")])  # xdp_desc
ADDR_DTYPE = np.dtype("<u8")

_U32 = 0xFFFFFFFF
SMALL_BATCH = 8  # at most this many entries: lists and memoryview access, no numpy call


def as_list(a: np.ndarray | list[int]) -> list[int]:
    """A batch from this module (a list if small, else an array) as a list of ints."""
    return a if type(a) is list else a.tolist()  # type: ignore[union-attr]


def _empty(dtype: str) -> np.ndarray:
    a = np.empty(0, dtype=dtype)
    a.flags.writeable = False  # shared: returned for every empty peek
    return a


_EMPTY_U64 = _empty("<u8")
_EMPTY_U32 = _empty("<u4")


class SockaddrXdp(ctypes.Structure):
    _fields_ = [("sxdp_family", ctypes.c_uint16), ("sxdp_flags", ctypes.c_uint16),
                ("sxdp_ifindex", ctypes.c_uint32), ("sxdp_queue_id", ctypes.c_uint32),
                ("sxdp_shared_umem_fd", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_libc.bind.restype = ctypes.c_int


class RingOffsets(NamedTuple):
    """One `struct xdp_ring_offset`: byte offsets inside the ring's mmap."""

    producer: int
    consumer: int
    desc: int
    flags: int


class MmapOffsets(NamedTuple):
    rx: RingOffsets
    tx: RingOffsets
    fill: RingOffsets
    comp: RingOffsets


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _setsockopt_u32(sock: socket.socket, opt: int, value: int) -> None:
    sock.setsockopt(SOL_XDP, opt, struct.pack("=I", value))


def mmap_offsets(sock: socket.socket) -> MmapOffsets:
    """getsockopt(XDP_MMAP_OFFSETS) in the v2 layout (with the flags offsets)."""
    raw = sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, MMAP_OFFSETS.size)
    if len(raw) != MMAP_OFFSETS.size:
        raise OSError(errno.EPROTO, f"XDP_MMAP_OFFSETS returned {len(raw)} bytes: kernel "
                                    "too old (need the v2 layout with ring flags, 5.4+)")
    v = MMAP_OFFSETS.unpack(raw)
    return MmapOffsets(*(RingOffsets(*v[i:i + 4]) for i in range(0, 16, 4)))


# ------------------------------------------------------------------------- rings

class _Ring:
    """A ring over a buffer (the kernel's mmap, or any buffer in tests)."""

    def __init__(self, buf: mmap.mmap | bytearray, size: int, off: RingOffsets,
                 dtype: np.dtype, name: str = "") -> None:
        if not _is_pow2(size):
            raise ValueError(f"ring size must be a power of two, not {size}")
        self.name = name
        self.size = size
        self.mask = size - 1
        self.offsets = off
        self._buf = buf
        self._words = memoryview(buf).cast("I")  # u32 view over the whole ring mmap
        self._p = off.producer // 4
        self._c = off.consumer // 4
        self._f = off.flags // 4
        self.desc = np.frombuffer(buf, dtype=dtype, count=size, offset=off.desc)
        # The descriptors as u64 words (xdp_desc: addr, then len | options << 32).
        self._q = memoryview(buf)[off.desc : off.desc + size * dtype.itemsize].cast("Q")

    @property
    def producer(self) -> int:
        return self._words[self._p]

    @property
    def consumer(self) -> int:
        return self._words[self._c]

    @property
    def flags(self) -> int:
        return self._words[self._f]

    def needs_wakeup(self) -> bool:
        return bool(self._words[self._f] & XDP_RING_NEED_WAKEUP)

    def close(self) -> None:
        """Drop our views and unmap (if nobody else still holds a view)."""
        if self._words is None:
            return
        self._words.release()
        self._words = None  # type: ignore[assignment]
        self._q.release()
        self.desc = None  # type: ignore[assignment]
        buf, self._buf = self._buf, None
        if isinstance(buf, mmap.mmap):
            # BufferError: a caller still holds a view; the mapping goes with it.
            with contextlib.suppress(BufferError):
                buf.close()


class ProducerRing(_Ring):
    """A ring user space produces into: fill (u64 addrs) or TX (xdp_desc)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._prod = self._words[self._p]                     # our producer (authoritative)
        self._cons = (self._words[self._c] + self.size) & _U32  # cached consumer + size

    def free(self, want: int | None = None) -> int:
        """Number of free slots (re-reads the kernel's consumer only if fewer than `want`)."""
        free = (self._cons - self._prod) & _U32
        if want is None or free < want:
            self._cons = (self._words[self._c] + self.size) & _U32
            free = (self._cons - self._prod) & _U32
        return free

    def pending(self) -> int:
        """Entries produced but not yet consumed by the kernel."""
        return (self._prod - self._words[self._c]) & _U32

    def _span(self, n: int) -> tuple[int, int]:
        """(first slot, entries before the wrap) for `n` entries from our producer."""
        idx = self._prod & self.mask
        return idx, min(n, self.size - idx)

    def _publish(self, n: int) -> None:
        self._prod = (self._prod + n) & _U32
        self._words[self._p] = self._prod  # after the descriptor stores (TSO: in order)


class FillRing(ProducerRing):
    def produce(self, addrs: np.ndarray | Sequence[int]) -> int:
        """Place as many of `addrs` (u64) as fit; returns how many were placed."""
        n = min(len(addrs), self.free(len(addrs)))
        if n <= 0:
            return 0
        if type(addrs) is list:
            if n > SMALL_BATCH:
                addrs = np.array(addrs, dtype=ADDR_DTYPE)
            else:
                q, mask, prod = self._q, self.mask, self._prod
                for i in range(n):
                    q[(prod + i) & mask] = addrs[i]
                self._publish(n)
                return n
        idx, first = self._span(n)
        d = self.desc
        d[idx:idx + first] = addrs[:first]
        if first < n:
            d[:n - first] = addrs[first:n]
        self._publish(n)
        return n


class TxRing(ProducerRing):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._addr = self.desc["addr"]
        self._len = self.desc["len"]
        self._opt = self.desc["options"]

    def produce(self, addrs: np.ndarray | Sequence[int],
                lens: np.ndarray | Sequence[int] | int) -> int:
        """Place descriptors (addr, len, options=0); returns how many were placed."""
        n = min(len(addrs), self.free(len(addrs)))
        if n <= 0:
            return 0
        if type(addrs) is list:
            if n > SMALL_BATCH:
                addrs = np.array(addrs, dtype=ADDR_DTYPE)
                if type(lens) is not int:
                    lens = np.array(lens, dtype=np.uint32)
            else:
                q, mask, prod = self._q, self.mask, self._prod
                for i in range(n):
                    k = ((prod + i) & mask) << 1
                    q[k] = addrs[i]
                    q[k + 1] = lens if type(lens) is int else lens[i]  # type: ignore[index]
                self._publish(n)
                return n
        scalar_len = np.ndim(lens) == 0
        idx, first = self._span(n)
        self._addr[idx:idx + first] = addrs[:first]
        self._len[idx:idx + first] = lens if scalar_len else lens[:first]
        self._opt[idx:idx + first] = 0
        if first < n:
            rest = n - first
            self._addr[:rest] = addrs[first:n]
            self._len[:rest] = lens if scalar_len else lens[first:n]
            self._opt[:rest] = 0
        self._publish(n)
        return n

    def close(self) -> None:
        self._addr = self._len = self._opt = None  # type: ignore[assignment]
        super().close()


class ConsumerRing(_Ring):
    """A ring user space consumes from: RX (xdp_desc) or completion (u64 addrs)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._cons = self._words[self._c]  # our consumer (authoritative)
        self._prod = self._words[self._p]  # cached kernel producer

    def available(self, want: int | None = None) -> int:
        """Entries ready (re-reads the kernel's producer only if fewer than `want`)."""
        n = (self._prod - self._cons) & _U32
        if want is None or n < want:
            self._prod = self._words[self._p]
            n = (self._prod - self._cons) & _U32
        return n

    def _take(self, arr: np.ndarray, n: int) -> np.ndarray:
        """Copy of the next `n` entries of `arr` (a view of the ring's descriptors)."""
        idx = self._cons & self.mask
        end = idx + n
        if end <= self.size:
            return arr[idx:end].copy()
        return np.concatenate((arr[idx:], arr[:end - self.size]))

    def _take_list(self, n: int, step: int) -> tuple[list[int], list[int]]:
        """The next `n` entries as u64 words: (first words, second words if step 2)."""
        q, mask, cons = self._q, self.mask, self._cons
        first = [q[((cons + i) & mask) * step] for i in range(n)]
        if step == 1:
            return first, []
        return first, [q[((cons + i) & mask) * 2 + 1] & _U32 for i in range(n)]

    def release(self, n: int) -> None:
        """Hand `n` consumed entries back to the kernel."""
        if n <= 0:
            return
        if n > (self._prod - self._cons) & _U32:
            raise ValueError(f"{self.name}: releasing {n} entries, only "
                             f"{(self._prod - self._cons) & _U32} were available")
        self._cons = (self._cons + n) & _U32
        self._words[self._c] = self._cons


class CompletionRing(ConsumerRing):
    def peek(self, max_n: int | None = None) -> np.ndarray | list[int]:
        """Copies of up to `max_n` completed addresses (a list if `SMALL_BATCH` or fewer)."""
        n = self.available(max_n)
        if max_n is not None:
            n = min(n, max_n)
        if n <= SMALL_BATCH:
            return self._take_list(n, 1)[0] if n else _EMPTY_U64
        return self._take(self.desc, n)

    def reap(self, max_n: int | None = None) -> np.ndarray | list[int]:
        """Copy out and release up to `max_n` completed TX addresses."""
        addrs = self.peek(max_n)
        self.release(len(addrs))
        return addrs


class RxRing(ConsumerRing):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._addr = self.desc["addr"]
        self._len = self.desc["len"]

    def peek(self, max_n: int) -> tuple[np.ndarray, np.ndarray] | tuple[list[int], list[int]]:
        """Copies of up to `max_n` (addrs u64, lens u32), as lists if `SMALL_BATCH` or
        fewer; `release` them when done."""
        n = min(self.available(max_n), max_n)
        if not n:
            return _EMPTY_U64, _EMPTY_U32
        if n <= SMALL_BATCH:
            return self._take_list(n, 2)
        return self._take(self._addr, n), self._take(self._len, n)

    def close(self) -> None:
        self._addr = self._len = None  # type: ignore[assignment]
        super().close()


def _map_ring(sock: socket.socket, pgoff: int, off: RingOffsets, size: int,
              dtype: np.dtype) -> mmap.mmap:
    length = off.desc + size * dtype.itemsize
    return mmap.mmap(sock.fileno(), length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)


# -------------------------------------------------------------------------- UMEM

class _Pool:
    """The fill/completion ring pair of one (ifindex, queue) of a UMEM."""

    def __init__(self, key: tuple[int, int], fill: FillRing, comp: CompletionRing) -> None:
        self.key = key
        self.fill = fill
        self.comp = comp
        self.users = 0

    def close(self) -> None:
        self.fill.close()
        self.comp.close()


class Umem:
    """A packet buffer area of `frame_count` frames of `frame_size` bytes.

    The area is an anonymous shared mapping (so it stays put, and pinned, if the
    process forks).  It is registered with the kernel by the first `XskSocket`
    that uses it; later sockets share it.  `alloc`/`free` hand out frame
    addresses (byte offsets into the area).  `buf` is a uint8 numpy view for
    batch work, `frame()` a memoryview of one frame.
    """

    def __init__(self, frame_count: int = DEFAULT_FRAME_COUNT,
                 frame_size: int = DEFAULT_FRAME_SIZE, *, headroom: int = 0,
                 fill_size: int = DEFAULT_RING_SIZE, comp_size: int = DEFAULT_RING_SIZE,
                 hugepages: bool = False) -> None:
        if not _is_pow2(frame_size) or frame_size < 2048:
            raise ValueError("frame_size must be a power of two >= 2048 (aligned chunks)")
        if frame_count <= 0:
            raise ValueError("frame_count must be positive")
        if headroom < 0 or headroom + XDP_PACKET_HEADROOM + 128 > frame_size:
            raise ValueError(f"headroom {headroom} leaves no room in {frame_size} B frames")
        if not (_is_pow2(fill_size) and _is_pow2(comp_size)):
            raise ValueError("fill_size and comp_size must be powers of two")
        self.frame_count = frame_count
        self.frame_size = frame_size
        self.headroom = headroom
        self.fill_size = fill_size
        self.comp_size = comp_size
        self.size = frame_count * frame_size
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        if hugepages:
            flags |= getattr(mmap, "MAP_HUGETLB", 0x40000)
        self._mm: mmap.mmap | None = mmap.mmap(-1, self.size, flags=flags,
                                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(anchor)
        del anchor  # a live ctypes export would keep the mmap from closing
        self._mv: memoryview | None = memoryview(self._mm)
        self.buf: np.ndarray | None = np.frombuffer(self._mm, dtype=np.uint8)
        self._frame_mask = ~np.uint64(frame_size - 1)
        # free-frame stack: addresses [0, top) are free; pops come from the top
        self._free_stack = (np.arange(frame_count, dtype=ADDR_DTYPE)[::-1]
                            * np.uint64(frame_size)).copy()
        self._top = frame_count
        self._free_q = memoryview(self._free_stack).cast("B").cast("Q")
        self._frame_bits = frame_size - 1
        self._sockets: list[XskSocket] = []   # live sockets using this UMEM
        self._pools: dict[tuple[int, int], _Pool] = {}
        self.closed = False

    # -- frames
    def frame(self, addr: int, length: int) -> memoryview:
        """Zero-copy view of `length` bytes at UMEM offset `addr`."""
        a = int(addr)
        if a < 0 or length < 0 or a + length > self.size:
            raise ValueError(f"frame [{a}, {a + length}) outside the UMEM")
        return self._mv[a:a + length]  # type: ignore[index]

    @property
    def n_free(self) -> int:
        return self._top

    def alloc(self, n: int) -> np.ndarray | list[int]:
        """Up to `n` free frame addresses (fewer if the allocator runs dry); a list if
        `SMALL_BATCH` or fewer."""
        k = min(n, self._top)
        self._top -= k
        if k <= SMALL_BATCH:
            return self._free_q[self._top : self._top + k].tolist()
        return self._free_stack[self._top:self._top + k].copy()

    def free(self, addrs: np.ndarray | Sequence[int]) -> None:
        """Return frames; any address inside a frame is accepted (normalized to its start)."""
        k = len(addrs)
        if k == 0:
            return
        if self._top + k > self.frame_count:
            raise ValueError(f"freeing {k} frames but only {self.frame_count - self._top} "
                             "are allocated (double free?)")
        if type(addrs) is list and k <= SMALL_BATCH:
            q, top, bits = self._free_q, self._top, self._frame_bits
            for i in range(k):
                q[top + i] = addrs[i] & ~bits
        else:
            a = np.asarray(addrs, dtype=ADDR_DTYPE)
            self._free_stack[self._top:self._top + k] = a & self._frame_mask
        self._top += k

    # -- kernel registration (called by XskSocket)
    def _register(self, sock: socket.socket) -> None:
        reg = UMEM_REG.pack(self.address, self.size, self.frame_size, self.headroom, 0, 0)
        sock.setsockopt(SOL_XDP, XDP_UMEM_REG, reg)

    def _make_pool(self, sock: socket.socket, key: tuple[int, int]) -> _Pool:
        """Create the fill/completion rings on `sock` (before bind) and map them."""
        _setsockopt_u32(sock, XDP_UMEM_FILL_RING, self.fill_size)
        _setsockopt_u32(sock, XDP_UMEM_COMPLETION_RING, self.comp_size)
        off = mmap_offsets(sock)
        fmm = _map_ring(sock, XDP_UMEM_PGOFF_FILL_RING, off.fill, self.fill_size, ADDR_DTYPE)
        try:
            cmm = _map_ring(sock, XDP_UMEM_PGOFF_COMPLETION_RING, off.comp, self.comp_size,
                            ADDR_DTYPE)
        except BaseException:
            fmm.close()
            raise
        return _Pool(key, FillRing(fmm, self.fill_size, off.fill, ADDR_DTYPE, name="fill"),
                     CompletionRing(cmm, self.comp_size, off.comp, ADDR_DTYPE, name="comp"))

    def close(self) -> None:
        """Close every socket still using this UMEM, then unmap it."""
        if self.closed:
            return
        self.closed = True
        for s in list(self._sockets):
            s.close()
        for p in list(self._pools.values()):
            p.close()
        self._pools.clear()
        self.buf = None
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        mm, self._mm = self._mm, None
        if mm is not None:
            # BufferError: a caller still holds a frame view; the mapping goes with it.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> Umem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------ socket

class XskSocket:
    """One AF_XDP socket bound to (interface, queue).

    `umem=None` creates a private `Umem` (closed with the socket).  Passing a
    `Umem` that other sockets already use shares it (XDP_SHARED_UMEM); bind
    flags then come from the first socket.  `mode` is "auto" (zero-copy if the
    driver can, else copy), "zerocopy" or "copy"; the result is in `self.mode`.
    rx_size or tx_size may be 0 for a one-way socket.  `tx_budget` is the
    copy-mode frames-per-sendto() limit to ask for (clamped to tx_size;
    `self.max_tx_budget` says what the kernel accepted).  `busy_timeout`: how
    long bind() retries EBUSY (a queue just released by a closed socket).
    """

    def __init__(self, ifname: str | int, queue_id: int = 0, umem: Umem | None = None, *,
                 rx_size: int = DEFAULT_RING_SIZE, tx_size: int = DEFAULT_RING_SIZE,
                 mode: str = "auto", need_wakeup: bool = True,
                 tx_budget: int = DEFAULT_TX_BUDGET, busy_timeout: float = 1.0) -> None:
        if mode not in ("auto", "zerocopy", "copy"):
            raise ValueError("mode must be 'auto', 'zerocopy' or 'copy'")
        if not rx_size and not tx_size:
            raise ValueError("need an RX or a TX ring")
        for n, what in ((rx_size, "rx_size"), (tx_size, "tx_size")):
            if n and not _is_pow2(n):
                raise ValueError(f"{what} must be a power of two")
        self.ifindex = ifname if isinstance(ifname, int) else socket.if_nametoindex(ifname)
        self.ifname = socket.if_indextoname(self.ifindex)
        self.queue_id = queue_id
        self._own_umem = umem is None
        self.umem = umem if umem is not None else Umem()
        if self.umem.closed:
            raise ValueError("UMEM is closed")
        self.rx: RxRing | None = None
        self.tx: TxRing | None = None
        self._pool: _Pool | None = None
        self.mode = ""
        self.zerocopy_error = ""  # why "auto" fell back to copy mode
        self.shared = False
        self.need_wakeup = need_wakeup
        self.busy_timeout = busy_timeout
        self.max_tx_budget = TX_BATCH_SIZE
        self.tx_syscalls = 0  # sendto() kicks made
        self.tx_eagain = 0    # ... of which returned EAGAIN/EBUSY/ENOBUFS
        self.offsets: MmapOffsets | None = None
        self.closed = False
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
            self._setup(rx_size, tx_size, mode, tx_budget)
        except BaseException:
            self.close()
            raise
        self._poller = select.poll()
        self._poller.register(self._sock.fileno(), select.POLLIN)
        self._scratch = bytearray(1)

    # -- setup
    def _setup(self, rx_size: int, tx_size: int, mode: str, tx_budget: int) -> None:
        umem, key = self.umem, (self.ifindex, self.queue_id)
        peer = next((s for s in umem._sockets if (s.ifindex, s.queue_id) == key), None)
        if peer is None and umem._sockets:
            peer = umem._sockets[0]
        new_pool = None
        if peer is None:
            umem._register(self._sock)
            new_pool = umem._make_pool(self._sock, key)
        elif (peer.ifindex, peer.queue_id) != key:
            new_pool = umem._make_pool(self._sock, key)  # own fill/comp for another queue
        self.shared = peer is not None
        if new_pool is not None:
            self._pool = new_pool
        else:
            self._pool = umem._pools[key]
        self._pool.users += 1
        umem._pools[key] = self._pool

        if rx_size:
            _setsockopt_u32(self._sock, XDP_RX_RING, rx_size)
        if tx_size:
            _setsockopt_u32(self._sock, XDP_TX_RING, tx_size)
        self.offsets = off = mmap_offsets(self._sock)
        if rx_size:
            mm = _map_ring(self._sock, XDP_PGOFF_RX_RING, off.rx, rx_size, DESC_DTYPE)
            self.rx = RxRing(mm, rx_size, off.rx, DESC_DTYPE, name="rx")
        if tx_size:
            mm = _map_ring(self._sock, XDP_PGOFF_TX_RING, off.tx, tx_size, DESC_DTYPE)
            self.tx = TxRing(mm, tx_size, off.tx, DESC_DTYPE, name="tx")

        if peer is not None:
            # A shared socket may not pass copy/zerocopy/need_wakeup: it inherits them.
            self._bind(XDP_SHARED_UMEM, peer.fileno())
            self.need_wakeup = peer.need_wakeup
        else:
            wake = XDP_USE_NEED_WAKEUP if self.need_wakeup else 0
            if mode == "copy":
                self._bind(XDP_COPY | wake)
            elif mode == "zerocopy":
                self._bind(XDP_ZEROCOPY | wake)
            else:
                try:
                    self._bind(XDP_ZEROCOPY | wake)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, ENOTSUPP):
                        raise
                    self.zerocopy_error = errno.errorcode.get(e.errno, str(e.errno))
                    self._bind(XDP_COPY | wake)
        opts = struct.unpack("=I", self._sock.getsockopt(SOL_XDP, XDP_OPTIONS, 4))[0]
        self.mode = "zerocopy" if opts & XDP_OPTIONS_ZEROCOPY else "copy"
        umem._sockets.append(self)

        if self.tx is not None and tx_budget > TX_BATCH_SIZE:
            budget = min(tx_budget, self.tx.size)
            try:
                _setsockopt_u32(self._sock, XDP_MAX_TX_SKB_BUDGET, budget)
                self.max_tx_budget = budget
            except OSError:
                pass  # kernel < 6.17: 32 frames per sendto(), kick() just loops more

    def _bind(self, flags: int, shared_fd: int = 0) -> None:
        """bind() through libc; EBUSY is retried for up to `busy_timeout` s.

        A queue stays busy for a while (20-40 ms on 6.18) after the socket that
        held it was closed: the kernel frees the buffer pool in deferred work
        (RCU + workqueue).  A queue held by a live socket stays busy: then the
        EBUSY is raised after the timeout.
        """
        sa = SockaddrXdp(AF_XDP, flags, self.ifindex, self.queue_id, shared_fd)
        deadline = time.monotonic() + self.busy_timeout
        err = 0
        for _ in range(10_000):
            if _libc.bind(self._sock.fileno(), ctypes.byref(sa), ctypes.sizeof(sa)) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.EBUSY or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        raise OSError(err, f"AF_XDP bind to {self.ifname} queue {self.queue_id} "
                           f"(flags {flags:#x}): {os.strerror(err)}")

    # -- plumbing
    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def fill_ring(self) -> FillRing:
        return self._pool.fill  # type: ignore[union-attr]

    @property
    def comp_ring(self) -> CompletionRing:
        return self._pool.comp  # type: ignore[union-attr]

    def poll(self, timeout: float | None = 0.0, events: int = select.POLLIN) -> bool:
        """Wait up to `timeout` s (None: forever) for `events` (POLLIN: RX ready)."""
        if events != select.POLLIN:
            self._poller.modify(self._sock.fileno(), events)
        try:
            ms = None if timeout is None else max(0, int(timeout * 1000))
            return bool(self._poller.poll(ms))
        finally:
            if events != select.POLLIN:
                self._poller.modify(self._sock.fileno(), select.POLLIN)

    def frame(self, addr: int, length: int) -> memoryview:
        return self.umem.frame(addr, length)

    # -- RX
    def rx_peek(self, max_n: int) -> tuple[np.ndarray, np.ndarray] | tuple[list[int], list[int]]:
        """Up to `max_n` received packets as (addrs u64, lens u32) copies (lists for a
        small batch)."""
        return self.rx.peek(max_n)  # type: ignore[union-attr]

    def rx_release(self, n: int) -> None:
        self.rx.release(n)  # type: ignore[union-attr]

    def fill(self, addrs: np.ndarray | Sequence[int]) -> int:
        """Give frames to the kernel for RX; returns how many were placed."""
        n = self.fill_ring.produce(addrs)
        if n and self.mode == "zerocopy" and self.fill_ring.needs_wakeup():
            self.wakeup_rx()
        return n

    def refill(self, max_n: int | None = None) -> int:
        """Top up the fill ring from the UMEM allocator; returns frames placed."""
        want = self.fill_ring.free()
        if max_n is not None:
            want = min(want, max_n)
        addrs = self.umem.alloc(want)
        n = self.fill(addrs)
        if n < len(addrs):
            self.umem.free(addrs[n:])
        return n

    def wakeup_rx(self) -> None:
        """Zero-length recvfrom(): wakes a zero-copy driver that sleeps on the fill ring."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT)

    # -- TX
    def tx_submit(self, addrs: np.ndarray | Sequence[int],
                  lens: np.ndarray | Sequence[int] | int) -> int:
        """Queue frames for TX (no syscall); returns how many fit in the TX ring."""
        return self.tx.produce(addrs, lens)  # type: ignore[union-attr]

    def kick(self, timeout: float = 0.05) -> int:
        """Make the kernel transmit what was submitted; returns descriptors still queued.

        Zero-copy: one sendto() if the driver asked for a wakeup (it then
        drains the ring asynchronously).  Copy mode: the sending happens inside
        sendto(), at most `max_tx_budget` frames per call, so call it until the
        ring is drained.  EAGAIN/EBUSY/ENOBUFS with progress just mean "call
        again"; without progress (full completion ring: call `complete`; busy
        device queue) retry with short sleeps for up to `timeout` s.
        """
        tx = self.tx
        if tx is None:
            raise ValueError("socket has no TX ring")
        pending = tx.pending()
        if pending == 0:
            return 0
        if self.mode == "zerocopy":
            if not self.need_wakeup or tx.needs_wakeup():
                self._sendto()
            return tx.pending()
        deadline = None
        # Every call with progress shrinks `pending`, so progress calls are bounded by
        # the ring size; calls without progress are bounded by `timeout`.
        for _ in range(tx.size + 10_000):
            self._sendto()
            now_pending = tx.pending()
            if now_pending == 0:
                return 0
            if now_pending < pending:
                pending = now_pending
                deadline = None
                continue
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now >= deadline:
                break
            time.sleep(0.0002)
        return pending

    def _sendto(self) -> None:
        self.tx_syscalls += 1
        try:
            self._sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self.tx_eagain += 1
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOBUFS, errno.EAGAIN):
                raise
            self.tx_eagain += 1

    def complete(self, max_n: int | None = None) -> np.ndarray | list[int]:
        """Reap the completion ring: addresses of frames the kernel is done sending (a
        list for a small batch)."""
        return self.comp_ring.reap(max_n)

    # -- stats / lifecycle
    def stats(self) -> dict[str, int]:
        raw = self._sock.getsockopt(SOL_XDP, XDP_STATISTICS, 8 * len(STATISTICS_FIELDS))
        vals = struct.unpack(f"={len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
        return dict(zip(STATISTICS_FIELDS, vals, strict=False))

    def close(self) -> None:
        """Unmap the rings, close the socket (removing it from any XSKMAP), release the UMEM."""
        if self.closed:
            return
        self.closed = True
        for ring in (self.rx, self.tx):
            if ring is not None:
                ring.close()
        self.rx = self.tx = None
        with contextlib.suppress(ValueError):
            self.umem._sockets.remove(self)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.users -= 1
            if pool.users <= 0:
                pool.close()
                if self.umem._pools.get(pool.key) is pool:
                    del self.umem._pools[pool.key]
        if self._sock is not None:
            with contextlib.suppress(AttributeError, KeyError, ValueError):
                self._poller.unregister(self._sock.fileno())
            self._sock.close()
        if self._own_umem:
            self.umem.close()

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"XskSocket({self.ifname!r}, queue={self.queue_id}, mode={self.mode!r}, "
                f"fd={-1 if self.closed else self.fileno()})")
