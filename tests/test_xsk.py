"""AF_XDP sockets (wgx.dataplane.xsk): ring logic unit tests + privileged veth tests.

How the privileged tests run.  bcc's XDP attach (netlink), the AF_XDP bind
and the XSKMAP all act on the caller's network namespace, and a process
cannot safely switch the netns of a multi-threaded pytest process (nor should
bcc's LLVM state end up in it).  So each part that must live in a lab
namespace runs in a child process, started with the lab's own helper
`Host.popen` (`ip netns exec NS python tests/test_xsk.py MODE ARGS...`): this
file doubles as the child script, see `_child_main`.  Children print one JSON
line "READY {...}" once set up and one JSON result line at the end; the test
process only orchestrates and asserts.  Every child loop is bounded by a
deadline, and the lab kills leftover children at teardown.

Flow control for the RX tests: the receiver writes how many packets it has
taken from the RX ring into a small shared file; the sender keeps at most
WINDOW datagrams in flight, fewer than the fill ring holds, so a scheduling
hiccup of the receiver cannot make the kernel drop packets (which would make
"all N arrive" flaky).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wgx.dataplane import xsk

HERE = Path(__file__).resolve().parent
BPF_SRC = HERE / "bpf" / "xsk_redirect.c"
IFACE = "ul0"
XSK_PORT = 40000
WINDOW = 128
CHILD_TIMEOUT = 60.0


# ============================================================== ring unit tests
# A fake ring "mmap": a bytearray with the layout 6.18 reports (producer 0,
# consumer 128, flags 196, descriptors 320); the test plays the kernel's side.

OFF = xsk.RingOffsets(producer=0, consumer=128, desc=320, flags=196)


def _fake(size: int, dtype: np.dtype, start: int) -> bytearray:
    buf = bytearray(OFF.desc + size * dtype.itemsize)
    struct.pack_into("=I", buf, OFF.producer, start)
    struct.pack_into("=I", buf, OFF.consumer, start)
    return buf


def _idx(buf: bytearray, off: int) -> int:
    return struct.unpack_from("=I", buf, off)[0]


def _set_idx(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("=I", buf, off, v & 0xFFFFFFFF)


def test_struct_layouts() -> None:
    assert xsk.UMEM_REG.size == 32
    assert xsk.MMAP_OFFSETS.size == 128
    assert xsk.DESC_DTYPE.itemsize == 16
    assert xsk.DESC_DTYPE.fields["len"][1] == 8 and xsk.DESC_DTYPE.fields["options"][1] == 12
    import ctypes
    assert ctypes.sizeof(xsk.SockaddrXdp) == 16


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0, 0xFFFFFFFF])
@pytest.mark.parametrize("as_list", [False, True], ids=["arrays", "lists"])
def test_fill_ring_wraps(start: int, as_list: bool) -> None:
    size = 8
    buf = _fake(size, xsk.ADDR_DTYPE, start)
    ring = xsk.FillRing(buf, size, OFF, xsk.ADDR_DTYPE, name="fill")
    assert ring.free() == size
    consumed: list[int] = []
    nxt = 0
    for _ in range(40):  # many laps around the ring and across 2**32
        want = np.arange(nxt, nxt + 5, dtype=np.uint64) * 2048
        n = ring.produce(want.tolist() if as_list else want)
        nxt += n
        prod, cons = _idx(buf, OFF.producer), _idx(buf, OFF.consumer)
        assert (prod - cons) & 0xFFFFFFFF <= size
        # kernel: consume 3 entries
        k = min(3, (prod - cons) & 0xFFFFFFFF)
        for j in range(k):
            slot = (cons + j) & (size - 1)
            consumed.append(struct.unpack_from("=Q", buf, OFF.desc + 8 * slot)[0])
        _set_idx(buf, OFF.consumer, cons + k)
    # everything produced so far, minus what is still queued, came out in order
    assert consumed == [i * 2048 for i in range(len(consumed))]
    assert ring.pending() == nxt - len(consumed)
    ring.close()


@pytest.mark.parametrize("start", [0, 0xFFFFFFFA])
@pytest.mark.parametrize(("size", "burst", "want"), [(8, 5, 4), (32, 13, 16)])
def test_rx_and_completion_rings_wrap(start: int, size: int, burst: int, want: int) -> None:
    """Batches up to xsk.SMALL_BATCH come back as lists, bigger ones as arrays; the
    second case mixes both, and every entry comes out once, in order."""
    buf = _fake(size, xsk.DESC_DTYPE, start)
    rx = xsk.RxRing(buf, size, OFF, xsk.DESC_DTYPE, name="rx")
    desc = np.frombuffer(buf, dtype=xsk.DESC_DTYPE, count=size, offset=OFF.desc)
    got_a: list[int] = []
    got_l: list[int] = []
    made = 0
    for _ in range(30):
        prod, cons = _idx(buf, OFF.producer), _idx(buf, OFF.consumer)
        room = size - ((prod - cons) & 0xFFFFFFFF)
        for j in range(min(room, burst)):  # the kernel produces up to `burst`
            desc[(prod + j) & (size - 1)] = (made * 4096 + 256, 60 + made, 0)
            made += 1
        _set_idx(buf, OFF.producer, prod + min(room, burst))
        addrs, lens = rx.peek(want)
        if len(addrs) > xsk.SMALL_BATCH:
            assert addrs.dtype == np.uint64 and lens.dtype == np.uint32
            addrs, lens = addrs.tolist(), lens.tolist()
        else:
            assert type(addrs) is list and type(lens) is list
        got_a += addrs
        got_l += lens
        rx.release(len(addrs))
    assert got_a == [i * 4096 + 256 for i in range(len(got_a))]
    assert got_l == [60 + i for i in range(len(got_l))]
    with pytest.raises(ValueError):
        rx.release(size + 1)
    del desc
    rx.close()

    cbuf = _fake(size, xsk.ADDR_DTYPE, start)
    comp = xsk.CompletionRing(cbuf, size, OFF, xsk.ADDR_DTYPE, name="comp")
    cdesc = np.frombuffer(cbuf, dtype=xsk.ADDR_DTYPE, count=size, offset=OFF.desc)
    out: list[int] = []
    made = 0
    for _ in range(20):
        prod = _idx(cbuf, OFF.producer)
        cons = _idx(cbuf, OFF.consumer)
        k = min(size - ((prod - cons) & 0xFFFFFFFF), burst + 2)
        for j in range(k):
            cdesc[(prod + j) & (size - 1)] = made
            made += 1
        _set_idx(cbuf, OFF.producer, prod + k)
        got = comp.reap()
        out += got if type(got) is list else got.tolist()
    assert out == list(range(made))
    del cdesc
    comp.close()


@pytest.mark.parametrize("seq", [np.array, list], ids=["arrays", "lists"])
def test_tx_ring_wraps_and_scalar_len(seq: Any) -> None:
    size = 4
    buf = _fake(size, xsk.DESC_DTYPE, 0xFFFFFFFE)
    tx = xsk.TxRing(buf, size, OFF, xsk.DESC_DTYPE, name="tx")
    assert tx.produce(seq([10, 20, 30]), 99) == 3
    _set_idx(buf, OFF.consumer, _idx(buf, OFF.consumer) + 3)  # kernel sent them
    assert tx.produce(seq([40, 50, 60, 70, 80]), seq([1, 2, 3, 4, 5])) == 4  # ring holds 4
    assert _idx(buf, OFF.producer) == (0xFFFFFFFE + 7) & 0xFFFFFFFF
    desc = np.frombuffer(buf, dtype=xsk.DESC_DTYPE, count=size, offset=OFF.desc)
    start = 0xFFFFFFFE + 3
    got = [tuple(int(x) for x in desc[(start + j) & 3]) for j in range(4)]
    assert got == [(40, 1, 0), (50, 2, 0), (60, 3, 0), (70, 4, 0)]
    assert tx.pending() == 4 and tx.free() == 0
    del desc
    tx.close()


@pytest.mark.parametrize("n", [3, xsk.SMALL_BATCH, xsk.SMALL_BATCH + 5])
def test_list_and_array_input_write_the_same_descriptors(n: int) -> None:
    """`produce` takes lists of any length: small ones entry by entry, bigger ones
    through numpy; the ring memory is the same as for arrays."""
    addrs = [(i + 1) * 2048 + 7 for i in range(n)]
    lens = [60 + i for i in range(n)]
    rings = []
    for seq in (np.array, list):
        tbuf = _fake(16, xsk.DESC_DTYPE, 0xFFFFFFF9)
        tx = xsk.TxRing(tbuf, 16, OFF, xsk.DESC_DTYPE, name="tx")
        assert tx.produce(seq(addrs) if seq is list else np.array(addrs, np.uint64),
                          seq(lens) if seq is list else np.array(lens, np.uint32)) == n
        fbuf = _fake(16, xsk.ADDR_DTYPE, 0xFFFFFFF9)
        fill = xsk.FillRing(fbuf, 16, OFF, xsk.ADDR_DTYPE, name="fill")
        assert fill.produce(list(addrs) if seq is list else np.array(addrs, np.uint64)) == n
        rings.append((bytes(tbuf), bytes(fbuf)))
        tx.close()
        fill.close()
    assert rings[0] == rings[1]


def test_bad_interface_and_sizes() -> None:
    with pytest.raises(OSError):
        xsk.XskSocket("wgx-no-such-if0", 0)
    with pytest.raises(ValueError):
        xsk.XskSocket(1, 0, rx_size=1000)
    with pytest.raises(ValueError):
        xsk.XskSocket(1, 0, rx_size=0, tx_size=0)


def test_umem_allocator() -> None:
    with xsk.Umem(frame_count=16, frame_size=2048) as umem:
        a = umem.alloc(10)
        assert len(a) == 10 and len(set(a.tolist())) == 10 and umem.n_free == 6
        assert all(int(x) % 2048 == 0 for x in a)
        b = umem.alloc(10)
        assert len(b) == 6 and umem.n_free == 0
        assert len(umem.alloc(1)) == 0
        umem.free(a + 256 + 14)  # RX-style addresses inside the frame are normalized
        assert umem.n_free == 10
        assert sorted(umem.alloc(10).tolist()) == sorted(a.tolist())
        umem.free(a)
        umem.free(b)
        with pytest.raises(ValueError):
            umem.free(b)  # double free overflows the stack
        v = umem.frame(2048, 4)
        v[:] = b"abcd"
        assert bytes(umem.buf[2048:2052]) == b"abcd"
        with pytest.raises(ValueError):
            umem.frame(16 * 2048 - 2, 4)
        v.release()
    with pytest.raises(ValueError):
        xsk.Umem(frame_count=4, frame_size=3000)


# ============================================================ shared helpers

def payload(i: int) -> bytes:
    """Datagram i of the RX test: sizes 64..1400 (0 -> 64, 1 -> 1400), seeded bytes."""
    r = random.Random(1_000_003 + i)
    size = 64 if i == 0 else 1400 if i == 1 else r.randint(64, 1400)
    return struct.pack("!IH", i, size) + r.randbytes(size - 6)


def ipv4_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_udp4_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str,
                     sport: int, dport: int, data: bytes, ident: int = 0) -> bytes:
    """Ethernet + IPv4 (checksummed) + UDP (checksum 0, allowed for IPv4)."""
    total = 20 + 8 + len(data)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", ipv4_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp + data


def parse_udp4(frame: bytes) -> tuple[int, bytes] | None:
    """(dst port, payload) of an Ethernet/IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    dport, ulen = struct.unpack_from("!2xHH", frame, 14 + ihl)
    if 14 + total > len(frame) or ulen != total - ihl:
        return None
    return dport, frame[14 + ihl + 8:14 + total]


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.strip().split(":"))


class Progress:
    """A u64 counter in a shared file: receiver publishes, sender reads."""

    def __init__(self, path: str, create: bool = False) -> None:
        if create:
            Path(path).write_bytes(bytes(8))
        self._f = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._mm = mmap.mmap(self._f.fileno(), 8)
        self._v = memoryview(self._mm).cast("Q")

    def get(self) -> int:
        return self._v[0]

    def set(self, n: int) -> None:
        self._v[0] = n

    def close(self) -> None:
        self._v.release()
        self._mm.close()
        self._f.close()


# =========================================================== child processes
# Run as `python tests/test_xsk.py MODE ARGS...` inside a lab namespace.

def _emit(tag: str | None, obj: dict) -> None:
    line = json.dumps(obj)
    print(f"{tag} {line}" if tag else line, flush=True)


def _load_xdp(iface: str):
    """Compile + attach the redirect program (native, else generic). Returns (bpf, flags)."""
    from bcc import BPF  # Debian's python3-bpfcc, only needed in the children

    b = BPF(src_file=str(BPF_SRC).encode(), cflags=[f"-DXSK_PORT={XSK_PORT}"])
    fn = b.load_func(b"xsk_redirect", BPF.XDP)
    for flags in (BPF.XDP_FLAGS_DRV_MODE, BPF.XDP_FLAGS_SKB_MODE):
        try:
            b.attach_xdp(iface.encode(), fn, flags)
            return b, flags
        except Exception:  # bcc raises plain Exception on netlink errors
            continue
    raise RuntimeError(f"cannot attach XDP to {iface}")


def _unload_xdp(b, iface: str, flags: int) -> None:
    b.remove_xdp(iface.encode(), flags)
    b.cleanup()


def _xskmap_set(b, queue: int, fd: int) -> None:
    import ctypes
    t = b.get_table(b"xsks_map")
    t[ctypes.c_int(queue)] = ctypes.c_int(fd)


def _counters(b) -> list[int]:
    t = b.get_table(b"counters")
    return [int(sum(t[t.Key(i)])) for i in range(2)]


def child_rx(n: int, progress_path: str, queues: str, frame_size: int, timeout: float) -> None:
    """Receive n datagrams (payload(i)) through AF_XDP on IFACE, verify bytes."""
    qs = [int(q) for q in queues.split(",")]
    prog = Progress(progress_path)
    b, flags = _load_xdp(IFACE)
    # Small rings on purpose: 1000 datagrams need the fill ring refilled (and
    # every ring index wrapped around) several times.
    umem = xsk.Umem(frame_count=512 * len(qs), frame_size=frame_size, fill_size=256,
                    comp_size=256)
    socks = [xsk.XskSocket(IFACE, q, umem, rx_size=256, tx_size=0) for q in qs]
    for s in socks:
        assert s.refill() == 256
        _xskmap_set(b, s.queue_id, s.fileno())
    s0 = socks[0]
    _emit("READY", {"mode": s0.mode, "zc_error": s0.zerocopy_error, "xdp_flags": flags,
                    "shared": [s.shared for s in socks],
                    "offsets": {k: v._asdict() for k, v in s0.offsets._asdict().items()},
                    "fill_flags": s0.fill_ring.flags})
    seen: dict[int, int] = {}
    bad: list[str] = []
    per_queue = [0] * len(qs)
    fills = 0
    fill_short = 0
    deadline = time.monotonic() + timeout
    total = 0
    while total < n and time.monotonic() < deadline:
        got_any = False
        for qi, s in enumerate(socks):
            addrs, lens = s.rx_peek(64)
            k = len(addrs)
            if not k:
                continue
            got_any = True
            for a, ln in zip(map(int, addrs), map(int, lens), strict=True):
                frame = bytes(s.frame(a, ln))
                p = parse_udp4(frame)
                if p is None or p[0] != XSK_PORT or len(p[1]) < 6:
                    bad.append(f"unparseable frame len {ln}: {frame[:48].hex()}")
                    continue
                idx = struct.unpack_from("!I", p[1])[0]
                if idx >= n or p[1] != payload(idx):
                    bad.append(f"payload mismatch idx {idx} len {len(p[1])}")
                    continue
                seen[idx] = seen.get(idx, 0) + 1
            s.rx_release(k)
            placed = s.fill(addrs)  # recycle the batch's frames in one step
            fills += 1
            if placed != k:
                fill_short += 1
                umem.free(addrs[placed:])
            per_queue[qi] += k
            total += k
            prog.set(total)
        if not got_any:
            socks[0].poll(0.01) if len(socks) == 1 else time.sleep(0.0005)
    stats = [s.stats() for s in socks]
    _emit(None, {"received": total, "distinct": len(seen),
                 "dups": sum(v - 1 for v in seen.values()),
                 "missing": [i for i in range(n) if i not in seen][:20],
                 "bad": bad[:20], "fills": fills, "fill_short": fill_short,
                 "per_queue": per_queue, "stats": stats, "xdp_counters": _counters(b),
                 "ring_idx": [s.rx.consumer for s in socks]})
    for s in socks:
        s.close()
    umem.close()
    _unload_xdp(b, IFACE, flags)
    prog.close()


def child_send_udp(dst: str, n: int, progress_path: str, flows: int, timeout: float) -> None:
    """Send payload(0..n-1) to dst:XSK_PORT from `flows` sockets, WINDOW in flight."""
    prog = Progress(progress_path)
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        socks.append(s)
    deadline = time.monotonic() + timeout
    sent = 0
    stalled = False
    while sent < n:
        if sent - prog.get() >= WINDOW:
            if time.monotonic() > deadline:
                stalled = True
                break
            time.sleep(0.0002)
            continue
        socks[sent % flows].sendto(payload(sent), (dst, XSK_PORT))
        sent += 1
    # wait for the receiver to catch up (or give up at the deadline)
    while prog.get() < sent and time.monotonic() < deadline:
        time.sleep(0.001)
    _emit(None, {"sent": sent, "stalled": stalled, "acked": prog.get()})
    for s in socks:
        s.close()
    prog.close()


def child_tx(dst_mac: str, n: int, dport: int, budget: int, timeout: float) -> None:
    """Build n Ethernet/IPv4/UDP frames in UMEM and send them via the TX ring."""
    src_mac = mac_bytes(Path(f"/sys/class/net/{IFACE}/address").read_text())
    sock = xsk.XskSocket(IFACE, 0, rx_size=0, tx_size=2048, tx_budget=budget)
    umem = sock.umem
    addrs = umem.alloc(n)
    assert len(addrs) == n
    lens = np.empty(n, dtype=np.uint32)
    for i, a in enumerate(map(int, addrs)):
        f = build_udp4_frame(mac_bytes(dst_mac), src_mac, "198.18.0.2", "198.18.0.1",
                             40001, dport, payload(i), ident=i)
        sock.frame(a, len(f))[:] = f
        lens[i] = len(f)
    _emit("READY", {"mode": sock.mode, "budget": sock.max_tx_budget,
                    "tx_flags": sock.tx.flags})
    t0 = time.perf_counter()
    submitted = sock.tx_submit(addrs, lens)
    left = sock.kick()
    t_kick = time.perf_counter() - t0
    done: list[np.ndarray] = []
    ndone = 0
    deadline = time.monotonic() + timeout
    while ndone < submitted and time.monotonic() < deadline:
        c = sock.complete()
        if len(c):
            done.append(c)
            ndone += len(c)
            umem.free(c)
        else:
            if sock.tx.pending():
                sock.kick()
            time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    comp = np.concatenate(done) if done else np.empty(0, np.uint64)
    _emit(None, {"submitted": submitted, "left_after_kick": left, "completed": ndone,
                 "completed_set_ok": sorted(map(int, comp)) == sorted(map(int, addrs)),
                 "sendto_calls": sock.tx_syscalls, "sendto_eagain": sock.tx_eagain,
                 "kick_s": t_kick, "elapsed_s": elapsed, "stats": sock.stats(),
                 "n_free": umem.n_free, "frame_count": umem.frame_count})
    sock.close()


def child_udp_recv(addr: str, port: int, n: int, timeout: float) -> None:
    """Receive payload(0..n-1) on a UDP socket; report what arrived intact."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: root, 16 MiB
    s.bind((addr, port))
    s.settimeout(0.2)
    _emit("READY", {})
    seen: dict[int, int] = {}
    bad = 0
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        idx = struct.unpack_from("!I", data)[0] if len(data) >= 4 else n
        if idx < n and data == payload(idx):
            seen[idx] = seen.get(idx, 0) + 1
        else:
            bad += 1
    # a short linger catches duplicates
    with contextlib.suppress(TimeoutError):
        s.settimeout(0.1)
        while True:
            data = s.recv(2048)
            idx = struct.unpack_from("!I", data)[0]
            seen[idx] = seen.get(idx, 0) + 1
    _emit(None, {"distinct": len(seen), "dups": sum(v - 1 for v in seen.values()),
                 "bad": bad, "missing": [i for i in range(n) if i not in seen][:20]})
    s.close()


def child_rx_count(seconds: float, idle: float) -> None:
    """Count 64 B frames through the RX ring as fast as possible (throughput sanity)."""
    b, flags = _load_xdp(IFACE)
    sock = xsk.XskSocket(IFACE, 0, rx_size=2048, tx_size=0)
    sock.refill()
    _xskmap_set(b, 0, sock.fileno())
    _emit("READY", {"mode": sock.mode})
    total = 0
    first = last = 0.0
    end = time.monotonic() + seconds
    while True:
        addrs, _lens = sock.rx_peek(256)
        k = len(addrs)
        now = time.monotonic()
        if k:
            if not total:
                first = now
            last = now
            total += k
            sock.rx_release(k)
            sock.fill(addrs)
            continue
        if now > end or (total and now - last > idle):
            break
        sock.poll(0.05)
    dt = max(last - first, 1e-9)
    _emit(None, {"received": total, "seconds": dt, "pps": total / dt if total > 1 else 0,
                 "stats": sock.stats()})
    sock.close()
    _unload_xdp(b, IFACE, flags)


def child_tx_blast(dst_mac: str, count: int, seconds: float) -> None:
    """Send `count` 64 B frames via AF_XDP TX as fast as possible (bounded by time)."""
    src_mac = mac_bytes(Path(f"/sys/class/net/{IFACE}/address").read_text())
    sock = xsk.XskSocket(IFACE, 0, rx_size=0, tx_size=2048)
    umem = sock.umem
    frame = build_udp4_frame(mac_bytes(dst_mac), src_mac, "198.18.0.1", "198.18.0.2",
                             40001, XSK_PORT, bytes(22))
    assert len(frame) == 64
    addrs = umem.alloc(umem.frame_count)
    for a in addrs.tolist():
        sock.frame(a, 64)[:] = frame
    umem.free(addrs)
    _emit("READY", {"mode": sock.mode, "budget": sock.max_tx_budget})
    sent = 0
    t0 = time.perf_counter()
    end = time.monotonic() + seconds
    while sent < count and time.monotonic() < end:
        c = sock.complete()
        if len(c):
            umem.free(c)
        batch = umem.alloc(min(1024, count - sent))
        k = sock.tx_submit(batch, 64)
        if k < len(batch):
            umem.free(batch[k:])
        sent += k
        sock.kick(timeout=0.002)
    sock.kick(timeout=0.1)
    dt = time.perf_counter() - t0
    _emit(None, {"sent": sent, "seconds": dt, "pps": sent / dt,
                 "sendto_calls": sock.tx_syscalls, "stats": sock.stats()})
    sock.close()


def _fd_targets() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _xdp_sockets_in_use() -> int:
    """AF_XDP sockets of this netns, from /proc/net/protocols (ss --xdp needs
    CONFIG_XDP_SOCKETS_DIAG, which this kernel lacks)."""
    for ln in Path("/proc/net/protocols").read_text().splitlines():
        f = ln.split()
        if f and f[0] == "XDP":
            return int(f[2])
    raise RuntimeError("no XDP line in /proc/net/protocols")


def _our_maps(inodes: list[int]) -> dict[str, int]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {"ring_maps": sum(1 for ln in lines for i in inodes if f"socket:[{i}]" in ln),
            "shared_anon_maps": sum(1 for ln in lines if "/dev/zero" in ln),
            "total": len(lines)}


def child_lifecycle(cycles: int) -> None:
    """Open/close sockets + attach/detach XDP repeatedly; report what is left."""
    base_fds = _fd_targets()
    base_maps = _our_maps([])
    base_inuse = _xdp_sockets_in_use()
    report = []
    inodes: list[int] = []
    for _ in range(cycles):
        b, flags = _load_xdp(IFACE)
        umem = xsk.Umem(frame_count=1024)
        try:  # veth cannot do zero-copy: the failed setup must clean up after itself
            xsk.XskSocket(IFACE, 0, umem, mode="zerocopy").close()
            zc_error = ""
        except OSError as e:
            zc_error = errno.errorcode.get(e.errno or 0, str(e.errno))
        s0 = xsk.XskSocket(IFACE, 0, umem, rx_size=512, tx_size=512)
        s1 = xsk.XskSocket(IFACE, 0, umem, rx_size=512, tx_size=512)  # same queue, shared
        s0.refill(256)
        _xskmap_set(b, 0, s0.fileno())
        held = umem.frame(0, 64)  # a view the caller forgot: close() must not fail
        ino = [os.fstat(s.fileno()).st_ino for s in (s0, s1)]
        inodes += ino
        during = {"inuse": _xdp_sockets_in_use(), **_our_maps(ino),
                  "link": subprocess.run(["ip", "-d", "link", "show", IFACE],
                                         capture_output=True, text=True, timeout=10).stdout}
        s1.close()
        s0.close()
        umem.close()
        del held
        t0 = time.monotonic()  # the queue is busy until the kernel's deferred release ran
        xsk.XskSocket(IFACE, 0, rx_size=64, tx_size=64).close()
        rebind_ms = (time.monotonic() - t0) * 1000
        _unload_xdp(b, IFACE, flags)
        report.append({"shared": s1.shared, "during": during, "zc_error": zc_error,
                       "rebind_ms": rebind_ms})
    fds = _fd_targets()
    link = subprocess.run(["ip", "-d", "link", "show", IFACE], capture_output=True, text=True,
                          timeout=10).stdout
    _emit(None, {"cycles": report, "base_maps": base_maps, "base_inuse": base_inuse,
                 "leaked_fds": {k: v for k, v in fds.items() if k not in base_fds},
                 "after_maps": _our_maps(inodes), "after_inuse": _xdp_sockets_in_use(),
                 "link": link})


def _child_main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "rx":
        child_rx(int(args[0]), args[1], args[2], int(args[3]), float(args[4]))
    elif mode == "send-udp":
        child_send_udp(args[0], int(args[1]), args[2], int(args[3]), float(args[4]))
    elif mode == "tx":
        child_tx(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
    elif mode == "udp-recv":
        child_udp_recv(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "rx-count":
        child_rx_count(float(args[0]), float(args[1]))
    elif mode == "tx-blast":
        child_tx_blast(args[0], int(args[1]), float(args[2]))
    elif mode == "lifecycle":
        child_lifecycle(int(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")


# ======================================================== privileged tests

class Child:
    """A child process of this file in a lab host's namespace."""

    def __init__(self, host, *args: str) -> None:
        self.host = host
        self.proc = host.popen([sys.executable, str(Path(__file__).resolve()), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buf += chunk
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            self.fail(f"no output line within {timeout}s (partial: {self._buf[-500:]!r})")
        self._buf = rest
        return line.decode()

    def fail(self, msg: str) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        err = b""
        with contextlib.suppress(Exception):
            _, err = self.proc.communicate(timeout=5)
        pytest.fail(f"{msg}\nchild stderr:\n{err.decode(errors='replace')[-4000:]}")

    def ready(self, timeout: float = CHILD_TIMEOUT) -> dict:
        line = self._line(timeout)
        if not line.startswith("READY "):
            self.fail(f"expected READY, got {line!r}")
        return json.loads(line[6:])

    def result(self, timeout: float = CHILD_TIMEOUT) -> dict:
        res = json.loads(self._line(timeout))
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.fail("child did not exit")
        if rc != 0:
            self.fail(f"child exited with rc={rc}")
        return res


def _mac(host, iface: str = IFACE) -> str:
    return host.run(["cat", f"/sys/class/net/{iface}/address"]).stdout.strip()


def _queues(host) -> int:
    out = host.run(["ethtool", "-l", IFACE]).stdout
    cur = out.split("Current hardware settings:")[1]
    return int(cur.split("RX:")[1].split()[0])


def _rx_roundtrip(lab, n: int, queues: list[int], flows: int,
                 frame_size: int = 2048) -> tuple[dict, dict, dict]:
    assert lab.dir is not None
    prog_path = str(lab.dir / "xsk-progress")
    Progress(prog_path, create=True).close()
    rx = Child(lab.b, "rx", str(n), prog_path, ",".join(map(str, queues)), str(frame_size),
               "40")
    ready = rx.ready()
    sender = Child(lab.a, "send-udp", lab.UNDERLAY4["b"], str(n), prog_path, str(flows), "30")
    sent = sender.result()
    res = rx.result()
    return ready, sent, res


def _check_rx(n: int, sent: dict, res: dict) -> None:
    assert sent["sent"] == n and not sent["stalled"], (sent, res)
    assert res["bad"] == [], res
    assert res["missing"] == [] and res["distinct"] == n and res["dups"] == 0, res
    assert res["received"] == n, res
    assert res["fill_short"] == 0 and res["fills"] > 1, res
    for st in res["stats"]:
        assert st["rx_dropped"] == 0 and st["rx_invalid_descs"] == 0, res
        assert st["rx_fill_ring_empty_descs"] == 0 and st["rx_ring_full"] == 0, res


@pytest.mark.privileged
@pytest.mark.parametrize("frame_size", [2048, 4096])
def test_rx_udp_through_xsk(lab, frame_size: int) -> None:
    """1000 UDP datagrams of 64..1400 B arrive intact through the RX ring (copy mode)."""
    for h in (lab.a, lab.b):  # one active queue pair: all traffic on queue 0
        h.run(["ethtool", "-L", IFACE, "rx", "1", "tx", "1"])
    assert _queues(lab.b) == 1
    n = 1000
    ready, sent, res = _rx_roundtrip(lab, n, [0], flows=1, frame_size=frame_size)
    print(f"\nbind mode {ready['mode']} (zero-copy refused: {ready['zc_error']}), "
          f"xdp flags {ready['xdp_flags']}, fill ring flags {ready['fill_flags']}, "
          f"offsets {ready['offsets']}")
    assert ready["fill_flags"] == 0  # copy mode never asks for an RX wakeup
    assert ready["mode"] == "copy"  # veth has no zero-copy support
    _check_rx(n, sent, res)
    # 1000 packets through 256-entry rings: the indices wrapped around ~4 times
    assert res["ring_idx"][0] == n
    assert res["xdp_counters"][0] == n


@pytest.mark.privileged
def test_rx_shared_umem_two_queues(lab) -> None:
    """Two sockets (queues 0 and 1) share one UMEM, each with its own fill/comp rings."""
    for h in (lab.a, lab.b):
        h.run(["ethtool", "-L", IFACE, "rx", "2", "tx", "2"])
    assert _queues(lab.b) == 2
    n = 1000
    ready, sent, res = _rx_roundtrip(lab, n, [0, 1], flows=32)
    assert ready["shared"] == [False, True]
    _check_rx(n, sent, res)
    print(f"\nper-queue packets {res['per_queue']}")
    assert all(c > 0 for c in res["per_queue"]), res["per_queue"]  # 32 flows over 2 queues


@pytest.mark.privileged
@pytest.mark.parametrize("budget", [256, 32])
def test_tx_udp_through_xsk(lab, budget: int) -> None:
    """1000 frames built in UMEM, sent by tx_submit + kick, all reach a UDP socket on a."""
    n = 1000
    recv = Child(lab.a, "udp-recv", lab.UNDERLAY4["a"], "40002", str(n), "30")
    recv.ready()
    tx = Child(lab.b, "tx", _mac(lab.a), str(n), "40002", str(budget), "20")
    info = tx.ready()
    res = tx.result()
    got = recv.result()
    print(f"\nTX mode {info['mode']} budget {info['budget']} tx flags {info['tx_flags']}: "
          f"{res['sendto_calls']} sendto calls ({res['sendto_eagain']} EAGAIN), "
          f"{n / res['kick_s']:.0f} pps through kick, stats {res['stats']}")
    assert info["mode"] == "copy"
    assert res["submitted"] == n and res["left_after_kick"] == 0, res
    assert res["completed"] == n and res["completed_set_ok"], res
    assert res["n_free"] == res["frame_count"], res  # every frame came back
    assert res["stats"]["tx_invalid_descs"] == 0, res
    assert got["bad"] == 0 and got["missing"] == [] and got["distinct"] == n, got
    assert got["dups"] == 0, got
    # 6.18 accepts XDP_MAX_TX_SKB_BUDGET; each sendto() then sends up to `budget` frames
    assert info["budget"] == budget, info
    assert info["tx_flags"] & xsk.XDP_RING_NEED_WAKEUP  # always set in copy mode
    assert res["sendto_calls"] <= -(-n // budget) + 2, res


@pytest.mark.privileged
def test_throughput_sanity(lab) -> None:
    """64 B frames: AF_XDP TX on a -> veth -> XDP -> AF_XDP RX on b. Prints pps only."""
    rx = Child(lab.b, "rx-count", "8", "0.5")
    rx.ready()
    tx = Child(lab.a, "tx-blast", _mac(lab.b), "400000", "3")
    tx.ready()
    t = tx.result()
    r = rx.result()
    print(f"\nAF_XDP TX (a): {t['sent']} frames in {t['seconds']:.2f}s = {t['pps']:.0f} pps, "
          f"{t['sendto_calls']} sendto calls\n"
          f"AF_XDP RX (b): {r['received']} frames in {r['seconds']:.2f}s = {r['pps']:.0f} pps, "
          f"stats {r['stats']}")
    assert t["sent"] > 0 and r["received"] > 0


@pytest.mark.privileged
def test_close_and_unload_leave_nothing(lab) -> None:
    """3 cycles of load/bind(2 sockets, shared UMEM)/close/unload leave no socket,
    fd, mapping or XDP program behind (a forgotten frame view included)."""
    res = Child(lab.b, "lifecycle", "3").result()
    print(f"\nimmediate rebind of the same queue took {[c['rebind_ms'] for c in res['cycles']]} ms")
    base = res["base_maps"]
    for c in res["cycles"]:
        d = c["during"]
        assert c["shared"] is True
        assert c["zc_error"] in ("EOPNOTSUPP", "ENOTSUP"), c
        # the checks below can see what they look for: sockets, ring maps, the UMEM map
        assert d["inuse"] == res["base_inuse"] + 2, c
        assert d["ring_maps"] >= 4, c  # fill, comp, rx, tx of s0 + rx, tx of s1
        assert d["shared_anon_maps"] == base["shared_anon_maps"] + 1, c
        assert "prog/xdp" in d["link"], c
    after = res["after_maps"]
    assert res["after_inuse"] == res["base_inuse"], res
    assert after["ring_maps"] == 0, res
    # the forgotten view kept the UMEM mapped only until it was dropped
    assert after["shared_anon_maps"] == base["shared_anon_maps"], res
    assert res["leaked_fds"] == {}, res
    assert "xdp" not in res["link"], res["link"]
    # and from outside, after the child exited
    assert "xdp" not in lab.b.ip("-d", "link", "show", IFACE)
    protocols = lab.b.run(["cat", "/proc/net/protocols"]).stdout
    xdp_line = next(ln for ln in protocols.splitlines() if ln.startswith("XDP "))
    assert xdp_line.split()[2] == "0", xdp_line


if __name__ == "__main__":
    _child_main(sys.argv[1:])
