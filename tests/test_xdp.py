"""The XDP classifier (bpf/wgx_xdp.c) and its loader (wgx/dataplane/xdp.py).

The privileged tests load the program on host b's ``ul0`` in a netlab Lab and
send crafted datagrams from host a with plain UDP sockets (IPv4 and IPv6), plus
hand-built frames through an AF_PACKET socket for what UDP sockets cannot make
(VLAN tags -- this kernel has no 8021q driver --, fragments, truncated headers).
A minimal AF_XDP socket (XskRx) checks that redirected frames really arrive.

How the test reaches into the namespaces: the loader itself takes ``netns=``
(only its netlink calls need the namespace; programs, maps and fds do not), and
the test's UDP sockets are created by a throwaway thread that setns()es into
the namespace first (``ns_socket``).  A socket keeps the namespace it was
created in for life, so the test's own thread never moves and nothing in the
root namespace is touched.  Only the SIGKILL test runs a real process inside
the namespace (``ip netns exec`` via Host.popen), as a daemon would.

Every datagram to the listen port must show up in exactly one verdict
counter; ``pass_not_ours`` is checked as a lower bound only, because ARP, ND
and MLD chatter on the link also lands there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import netlab
import pytest

from wgx.dataplane import xdp
from wgx.dataplane.xdp import VERDICT_NAMES, XdpError, XdpProgram
from wgx.protocol.messages import pack_transport_header

REPO = Path(__file__).resolve().parents[1]
C_SOURCE = REPO / "bpf" / "wgx_xdp.c"
PORT = 51820
OTHER_PORT = 51999
DST = {4: netlab.Lab.UNDERLAY4["b"], 6: netlab.Lab.UNDERLAY6["b"]}
IDX = 0x11223344

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_IP_MTU_DISCOVER, _IP_PMTUDISC_DONT = 10, 0
_IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DONT = 23, 0


# ------------------------------------------------------------- unprivileged

def test_verdict_names_match_c_enum() -> None:
    text = C_SOURCE.read_text()
    m = re.search(r"enum wgx_verdict \{(.*?)\};", text, re.S)
    assert m, "enum wgx_verdict not found in bpf/wgx_xdp.c"
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    names = re.findall(r"^\s*WGX_V_([A-Z0-9_]+)", body, re.M)
    assert names[-1] == "_COUNT"
    assert tuple(n.lower() for n in names[:-1]) == VERDICT_NAMES
    # only the first member has an explicit value (0): the order is the index
    assert re.findall(r"=\s*(\w+)", body) == ["0"]


def test_c_and_python_layouts_agree() -> None:
    text = C_SOURCE.read_text()
    for macro, value in (("WGX_SESSIONS_MAX", xdp.SESSIONS_MAX),
                         ("WGX_XSKS_MAX", xdp.XSKS_MAX),
                         ("WGX_RATELIMIT_MAX", xdp.RATELIMIT_MAX),
                         ("WGX_KNOWN_MAX", xdp.KNOWN_MAX)):
        assert re.search(rf"#define {macro} {value}\b", text), macro
    assert f"int {xdp.PROG_NAME}(struct xdp_md *ctx)" in text
    for name in xdp.MAP_NAMES:
        assert re.search(rf"\b{name}\b", text), name
    assert (xdp.CONFIG_FMT.size, xdp.SESSION_FMT.size, xdp.COUNTER_FMT.size) == (40, 16, 16)
    assert xdp.RL_KEY_FMT.size == 12
    assert XdpProgram.source_key("198.18.0.1") == b"\x04\0\0\0\xc6\x12\x00\x01" + bytes(4)
    assert XdpProgram.source_key("::ffff:198.18.0.1") == XdpProgram.source_key("198.18.0.1")
    assert XdpProgram.source_key("fd18::1") == XdpProgram.source_key("fd18::2:3")  # the /64
    assert re.search(r"#define WGX_CFG_UNDER_LOAD 1\b", text) and xdp.CFG_UNDER_LOAD == 1


# ------------------------------------------------------------------ helpers

def in_netns(host: netlab.Host, fn):
    """Run fn() in a throwaway thread that first setns()es into `host`'s netns."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{host.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {host.name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["result"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["err"] = e

    t = threading.Thread(target=run, name=f"setns-{host.name}")
    t.start()
    t.join(10)
    if "err" in out:
        raise out["err"]  # type: ignore[misc]
    assert "result" in out, "netns thread hung"
    return out["result"]


def ns_socket(host: netlab.Host, family: int, type_: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket created inside `host`'s netns (sockets keep their netns for life)."""
    return in_netns(host, lambda: socket.socket(family, type_))


class Receiver:
    """IPv4 + IPv6 UDP sockets on one port inside a namespace; collects payloads."""

    def __init__(self, host: netlab.Host, port: int):
        self.socks = []
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = ns_socket(host, fam)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((addr, port))
            s.setblocking(False)
            self.socks.append(s)
        self.got: list[bytes] = []

    def poll(self) -> int:
        for _ in range(10_000):  # bounded drain
            r, _, _ = select.select(self.socks, [], [], 0)
            if not r:
                break
            for s in r:
                with contextlib.suppress(BlockingIOError):
                    self.got.append(s.recv(65535))
        return len(self.got)

    def take(self) -> list[bytes]:
        self.poll()
        got, self.got = self.got, []
        return got

    def close(self) -> None:
        for s in self.socks:
            s.close()


class XskRx:
    """A minimal AF_XDP receive socket (copy mode): UMEM, fill ring and rx ring.

    Only what this test needs to see frames that the program redirects; the real
    AF_XDP dataplane lives in wgx/dataplane/xsk.py.
    """

    SOL_XDP, AF_XDP = 283, 44
    XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_UMEM_REG = 1, 2, 4
    XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING = 5, 6
    XDP_COPY = 1 << 1
    PGOFF_RX, PGOFF_FILL = 0, 0x100000000
    NFRAMES, FRAME = 64, 2048

    def __init__(self, host: netlab.Host, ifindex: int, queue: int):
        self.sock = ns_socket(host, self.AF_XDP, socket.SOCK_RAW)
        self.fd = fd = self.sock.fileno()
        self.umem = mmap.mmap(-1, self.NFRAMES * self.FRAME)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.umem))
        self._setopt(self.XDP_UMEM_REG, struct.pack("=QQIIII", addr, len(self.umem),
                                                    self.FRAME, 0, 0, 0))
        for opt in (self.XDP_UMEM_FILL_RING, self.XDP_UMEM_COMPLETION_RING, self.XDP_RX_RING):
            self._setopt(opt, struct.pack("=i", self.NFRAMES))
        off = self._getopt(self.XDP_MMAP_OFFSETS, 128)
        rx_prod, rx_cons, rx_desc, _ = struct.unpack_from("=4Q", off, 0)
        fr_prod, fr_cons, fr_desc, _ = struct.unpack_from("=4Q", off, 64)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self.fill = mmap.mmap(fd, fr_desc + 8 * self.NFRAMES, mmap.MAP_SHARED, prot,
                              offset=self.PGOFF_FILL)
        self.rx = mmap.mmap(fd, rx_desc + 16 * self.NFRAMES, mmap.MAP_SHARED, prot,
                            offset=self.PGOFF_RX)
        self.rx_prod, self.rx_cons, self.rx_desc = rx_prod, rx_cons, rx_desc
        for i in range(self.NFRAMES):  # hand every frame to the kernel
            struct.pack_into("=Q", self.fill, fr_desc + 8 * i, i * self.FRAME)
        struct.pack_into("=I", self.fill, fr_prod, self.NFRAMES)
        sxdp = struct.pack("=HHIII", self.AF_XDP, self.XDP_COPY, ifindex, queue, 0)
        if _libc.bind(fd, ctypes.c_char_p(sxdp), len(sxdp)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind AF_XDP queue {queue}: {os.strerror(err)}")
        self.seen = 0

    def _setopt(self, opt: int, val: bytes) -> None:
        if _libc.setsockopt(self.fd, self.SOL_XDP, opt, ctypes.c_char_p(val), len(val)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setsockopt SOL_XDP {opt}: {os.strerror(err)}")

    def _getopt(self, opt: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = ctypes.c_uint32(size)
        if _libc.getsockopt(self.fd, self.SOL_XDP, opt, buf, ctypes.byref(n)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"getsockopt SOL_XDP {opt}: {os.strerror(err)}")
        return buf.raw[:n.value]

    def frames(self) -> list[bytes]:
        """Frames received since the last call (the test never needs > NFRAMES)."""
        prod = struct.unpack_from("=I", self.rx, self.rx_prod)[0]
        out = []
        for i in range(self.seen, prod):
            addr, length, _ = struct.unpack_from("=QII", self.rx,
                                                 self.rx_desc + 16 * (i % self.NFRAMES))
            out.append(bytes(self.umem[addr:addr + length]))
        self.seen = prod
        struct.pack_into("=I", self.rx, self.rx_cons, prod)
        return out

    def close(self) -> None:
        for m in (self.rx, self.fill):
            m.close()
        self.sock.close()
        self.umem.close()


def wg(msg_type: int, size: int, reserved: bytes = b"\0\0\0") -> bytes:
    """A message of `size` bytes with the given type and reserved bytes (rest random)."""
    head = bytes([msg_type]) + reserved
    return (head + os.urandom(max(0, size - 4)))[:size]


def data(index: int, counter: int, size: int = 32) -> bytes:
    return pack_transport_header(index, counter) + os.urandom(size - 16)


class Probe:
    """Sends from host a to host b and checks verdict deltas + what was delivered."""

    def __init__(self, lab: netlab.Lab, prog: XdpProgram, dst: dict[int, str] | None = None):
        self.prog = prog
        self.dst = dst or DST
        self.tx = {4: ns_socket(lab.a, socket.AF_INET), 6: ns_socket(lab.a, socket.AF_INET6)}
        self.tx[4].setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
        self.tx[6].setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DONT)
        self.rx = Receiver(lab.b, PORT)
        self.rx_other = Receiver(lab.b, OTHER_PORT)

    def close(self) -> None:
        for s in self.tx.values():
            s.close()
        self.rx.close()
        self.rx_other.close()

    def send(self, payload: bytes, fam: int = 4, port: int = PORT,
             sock: socket.socket | None = None) -> None:
        (sock or self.tx[fam]).sendto(payload, (self.dst[fam], port))

    def check(self, sends: list[tuple[int, int, bytes]], expect: dict[str, int], *,
              delivered: list[bytes] | None = None, delivered_other: list[bytes] | None = None,
              frames: int | None = None, not_ours_min: int = 0,
              sock: dict[int, socket.socket] | None = None,
              raw: tuple[socket.socket, list[bytes]] | None = None) -> dict[str, int]:
        """Send (family, port, payload) datagrams; then require exactly `expect` in
        every verdict but pass_not_ours (>= not_ours_min), and exactly `delivered`
        / `delivered_other` (multisets) on the two receivers.  `frames` is the
        number of frames that get a verdict other than pass_not_ours (default: the
        number of datagrams to PORT).  `raw` = (AF_PACKET socket, frames) to inject."""
        before = self.prog.verdicts()
        for fam, port, payload in sends:
            self.send(payload, fam, port, sock=(sock or {}).get(fam))
        if raw is not None:
            for frame in raw[1]:
                raw[0].send(frame)
        if frames is None:
            frames = sum(1 for _, port, _ in sends if port == PORT)
        delivered = delivered or []
        delivered_other = delivered_other or []

        def delta() -> dict[str, int]:
            now = self.prog.verdicts()
            return {k: now[k] - before[k] for k in VERDICT_NAMES}

        def settled() -> bool:
            d = delta()
            ours = sum(v for k, v in d.items() if k != "pass_not_ours")
            return (ours >= frames and d["pass_not_ours"] >= not_ours_min
                    and self.rx.poll() >= len(delivered)
                    and self.rx_other.poll() >= len(delivered_other))

        with contextlib.suppress(netlab.NetlabError):
            netlab.wait_until(settled, timeout=5.0, interval=0.02, what="verdicts")
        time.sleep(0.05)  # let stragglers (that should not exist) show up
        d = delta()
        got = {k: v for k, v in d.items() if v and k != "pass_not_ours"}
        assert got == {k: v for k, v in expect.items() if v}, f"verdict deltas {d}"
        assert d["pass_not_ours"] >= not_ours_min, f"verdict deltas {d}"
        assert sorted(self.rx.take()) == sorted(delivered)
        assert sorted(self.rx_other.take()) == sorted(delivered_other)
        return d


@pytest.fixture
def loaded(lab: netlab.Lab):
    """(lab, prog, probe) with the program on b's ul0, armed for PORT."""
    prog = XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns=lab.b.name)
    probe = None
    try:
        probe = Probe(lab, prog)
        # warm up ARP/ND so that later bursts are not queued behind resolution
        warm = [(4, OTHER_PORT, b"warm4"), (6, OTHER_PORT, b"warm6")]
        probe.check(warm, {}, delivered_other=[b"warm4", b"warm6"], not_ours_min=2)
        yield lab, prog, probe
    finally:
        if probe is not None:
            probe.close()
        prog.detach()


def xdp_shown(host: netlab.Host) -> bool:
    out = host.ip("-d", "link", "show", "dev", netlab.UNDERLAY_IF)
    return "prog/xdp" in out or re.search(r"\bxdp(generic)?\b", out.split("\n", 1)[0]) is not None


# --------------------------------------------------------------- privileged

@pytest.mark.privileged
def test_classification(loaded) -> None:
    lab, prog, probe = loaded
    assert prog.attach_mode == "native"  # veth has native XDP
    assert xdp.attached_programs(netlab.UNDERLAY_IF, lab.b.name) == {
        "native": {"id": prog.prog_id, "name": xdp.PROG_NAME}}
    assert prog.listen_port == PORT and not prog.under_load

    # handshake messages of the exact sizes reach the daemon's socket
    hs = [wg(1, 148), wg(2, 92), wg(3, 64)]
    hs6 = [wg(1, 148), wg(2, 92), wg(3, 64)]
    probe.check([(4, PORT, m) for m in hs] + [(6, PORT, m) for m in hs6],
                {"pass_initiation": 2, "pass_response": 2, "pass_cookie": 2},
                delivered=hs + hs6)

    # junk on our port is dropped, by reason
    bad_size = [wg(1, 147), wg(1, 149), wg(2, 91), wg(2, 93), wg(3, 63), wg(3, 65),
                data(IDX, 0, 31), data(IDX, 0, 16)]
    bad_type = [wg(0, 148), wg(5, 148), wg(255, 32)]
    reserved = [wg(1, 148, b"\0\0\1"), wg(4, 32, b"\1\0\0"), wg(2, 92, b"\0\1\0")]
    malformed = [b"", b"\x01", b"\x01\x00\x00"]
    # Lengths need not be 16-aligned past the header: senders pad only up to the
    # tunnel MTU (1420 + 32 = 1452 B messages are normal), so these reach the
    # index check, and IDX is not a session yet.
    unknown = [data(0xDEADBEEF, 1), data(IDX, 1, 1440), data(IDX, 0, 40), data(IDX, 0, 47)]
    junk = bad_size + bad_type + reserved + malformed + unknown
    probe.check([(4 if i % 2 else 6, PORT, m) for i, m in enumerate(junk)],
                {"drop_bad_size": 8, "drop_bad_type": 3, "drop_reserved": 3,
                 "drop_malformed": 3, "drop_unknown_index": 4})

    # a known receiver index: no AF_XDP socket is bound, so it falls back to PASS
    prog.add_session(IDX)
    assert prog.session(IDX) == {"floor": 0, "peer_id": 0, "flags": 0}
    assert prog.session_indices() == [IDX]
    ok = [data(IDX, 0), data(IDX, 7, 64), data(IDX, 8, 1440)]
    probe.check([(4, PORT, ok[0]), (6, PORT, ok[1]), (4, PORT, ok[2])],
                {"pass_data_no_xsk": 3}, delivered=ok)

    # counters below the session's floor are dropped
    prog.set_session_floor(IDX, 1000)
    assert prog.session(IDX)["floor"] == 1000
    stale = [data(IDX, 999), data(IDX, 0, 48)]
    fresh = [data(IDX, 1000), data(IDX, 1 << 40, 48)]
    probe.check([(4, PORT, stale[0]), (6, PORT, stale[1]), (4, PORT, fresh[0]),
                 (6, PORT, fresh[1])],
                {"drop_stale_counter": 2, "pass_data_no_xsk": 2}, delivered=fresh)
    with pytest.raises(KeyError):
        prog.set_session_floor(0xABCDEF, 5)

    # a forgotten index is unknown again
    assert prog.remove_session(IDX) is True
    assert prog.remove_session(IDX) is False
    probe.check([(4, PORT, data(IDX, 5000))], {"drop_unknown_index": 1})

    # other ports are untouched, even WireGuard-looking junk
    other = [wg(1, 148), wg(9, 3), b"", data(IDX, 0, 31)]
    probe.check([(4, OTHER_PORT, m) for m in other[:2]] + [(6, OTHER_PORT, m)
                                                           for m in other[2:]],
                {}, delivered_other=other, not_ours_min=4)

    # the port is run-time configuration: no recompile to move it, 0 disarms
    prog.set_listen_port(OTHER_PORT)
    moved, now_other = wg(1, 148), wg(9, 148)
    probe.check([(4, OTHER_PORT, moved), (4, OTHER_PORT, wg(9, 148)), (6, PORT, now_other)],
                {"pass_initiation": 1, "drop_bad_type": 1}, frames=2,
                delivered=[now_other], delivered_other=[moved], not_ours_min=1)
    prog.set_listen_port(0)
    off = [wg(9, 148), wg(1, 7)]
    probe.check([(4, PORT, m) for m in off], {}, frames=0, delivered=off, not_ours_min=2)
    prog.set_listen_port(PORT)
    assert prog.listen_port == PORT

    # IPv4 options (IHL 6) are parsed, not mistaken for the UDP header
    opt = ns_socket(lab.a, socket.AF_INET)
    try:
        opt.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")
        init = wg(1, 148)
        probe.check([(4, PORT, init), (4, PORT, wg(7, 148))],
                    {"pass_initiation": 1, "drop_bad_type": 1}, delivered=[init],
                    sock={4: opt})
    finally:
        opt.close()

    # IPv4 fragments pass untouched (3000 B over MTU 1500: 3 fragments each) and
    # are reassembled by the stack; IPv6 fragments have next header 44: not ours
    big = [wg(1, 3000), wg(9, 3000)]
    big6 = wg(4, 3000)
    probe.check([(4, PORT, big[0]), (4, OTHER_PORT, big[1]), (6, PORT, big6)],
                {"pass_fragment": 6}, frames=6, delivered=[big[0], big6],
                delivered_other=[big[1]], not_ours_min=3)

    v = prog.verdict_stats()
    assert v["pass_initiation"][0] >= 3 and v["pass_initiation"][1] >= 3 * (14 + 20 + 8 + 148)


@pytest.mark.privileged
def test_under_load_ratelimits_initiations_per_source(loaded) -> None:
    _lab, prog, probe = loaded
    prog.set_under_load(True)
    assert prog.under_load

    for fam, n in ((4, 50), (6, 20)):  # separate buckets: IPv4 address, IPv6 /64
        msgs = [wg(1, 148) for _ in range(n)]
        before = prog.verdicts()
        t0 = time.monotonic()
        for m in msgs:
            probe.send(m, fam)
        elapsed = time.monotonic() - t0
        netlab.wait_until(lambda b=before, n=n: sum(
            prog.verdicts()[k] - b[k] for k in ("pass_initiation", "drop_ratelimit")) >= n,
            timeout=5.0, what="initiation verdicts")
        time.sleep(0.05)
        after = prog.verdicts()
        passed = after["pass_initiation"] - before["pass_initiation"]
        dropped = after["drop_ratelimit"] - before["drop_ratelimit"]
        assert passed + dropped == n
        # burst 5, then one token per 50 ms (20/s) of sending time
        assert 5 <= passed <= 5 + int(elapsed * 20) + 1, (passed, elapsed)
        netlab.wait_until(lambda p=passed: probe.rx.poll() >= p, timeout=5.0)
        time.sleep(0.05)
        got = probe.rx.take()
        assert len(got) == passed and set(got) <= set(msgs)

    # responses and cookies are not rate limited, and other verdicts still work
    resp = [wg(2, 92) for _ in range(10)] + [wg(3, 64)]
    probe.check([(4, PORT, m) for m in resp] + [(4, PORT, wg(1, 100))],
                {"pass_response": 10, "pass_cookie": 1, "drop_bad_size": 1}, delivered=resp)

    # the bucket refills at 20/s up to the burst: after 0.3 s it is full again
    time.sleep(0.3)
    before = prog.verdicts()
    t0 = time.monotonic()
    for _ in range(20):
        probe.send(wg(1, 148), 4)
    elapsed = time.monotonic() - t0
    netlab.wait_until(lambda: sum(prog.verdicts()[k] - before[k]
                                  for k in ("pass_initiation", "drop_ratelimit")) >= 20,
                      timeout=5.0)
    passed = prog.verdicts()["pass_initiation"] - before["pass_initiation"]
    assert 5 <= passed <= 5 + int(elapsed * 20) + 1, (passed, elapsed)
    netlab.wait_until(lambda: probe.rx.poll() >= passed, timeout=5.0)
    probe.rx.take()

    # not under load: everything passes again
    prog.set_under_load(False)
    init = [wg(1, 148) for _ in range(30)]
    probe.check([(4, PORT, m) for m in init], {"pass_initiation": 30}, delivered=init)


@pytest.mark.privileged
def test_under_load_global_budget_spares_known_sources(loaded) -> None:
    """Unknown sources share one global initiation budget under load; known ones do not."""
    _lab, prog, probe = loaded
    prog.set_under_load(True)
    prog.set_ratelimit(1e6, 1000)  # per-source limit out of the way
    prog.set_global_ratelimit(1.0 * xdp.possible_cpus(), 2)  # 1/s and a burst of 2 per CPU
    n = 30
    msgs = [wg(1, 148) for _ in range(n)]
    before = prog.verdicts()
    for m in msgs:
        probe.send(m, 4)
    netlab.wait_until(lambda: sum(prog.verdicts()[k] - before[k] for k in (
        "pass_initiation", "drop_ratelimit_global")) >= n, timeout=5.0)
    after = prog.verdicts()
    passed = after["pass_initiation"] - before["pass_initiation"]
    assert 1 <= passed <= 3 * xdp.possible_cpus(), passed  # the burst(s) and a token or so
    assert after["drop_ratelimit_global"] - before["drop_ratelimit_global"] == n - passed
    assert after["drop_ratelimit"] == before["drop_ratelimit"]
    netlab.wait_until(lambda: probe.rx.poll() >= passed, timeout=5.0)
    time.sleep(0.05)
    probe.rx.take()

    # The same source as a known peer endpoint: only its own bucket applies.
    prog.set_known_sources([netlab.Lab.UNDERLAY4["a"], "fd18::1"])
    assert len(prog.known_sources()) == 2
    probe.check([(4, PORT, m) for m in msgs], {"pass_initiation": n}, delivered=msgs)
    prog.set_known_sources([netlab.Lab.UNDERLAY4["b"]])
    assert prog.known_sources() == [XdpProgram.source_key(netlab.Lab.UNDERLAY4["b"])]
    prog.set_global_ratelimit(0, 0)  # off: unknown sources pass again
    probe.check([(4, PORT, m) for m in msgs], {"pass_initiation": n}, delivered=msgs)
    prog.set_under_load(False)


@pytest.mark.privileged
def test_redirect_to_af_xdp_socket(loaded) -> None:
    """Known-index transport data lands in the AF_XDP socket of its rx queue."""
    lab, prog, probe = loaded
    # real (active) rx queues; `ip netns exec` mounts the namespace's own sysfs
    ls = lab.b.run(["ls", f"/sys/class/net/{netlab.UNDERLAY_IF}/queues"]).stdout.split()
    nqueues = sum(1 for q in ls if q.startswith("rx-"))
    assert nqueues >= 1
    xsks = []
    try:
        for q in range(nqueues):  # veth spreads flows over its rx queues: cover all
            x = XskRx(lab.b, prog.ifindex, q)
            xsks.append(x)
            prog.set_xsk(q, x.fd)
        prog.add_session(IDX)
        msgs = [data(IDX, i, 32 + 16 * i) for i in range(8)]
        sends = [(4 if i % 2 else 6, PORT, m) for i, m in enumerate(msgs)]
        sends.append((4, PORT, wg(1, 148)))  # handshakes still go to the socket
        probe.check(sends, {"redirect_data": 8, "pass_initiation": 1},
                    delivered=[sends[-1][2]])
        got: list[bytes] = []
        netlab.wait_until(lambda: (got.extend(f for x in xsks for f in x.frames())
                                   or len(got) >= len(msgs)), timeout=5.0, what="xsk rx")
        # each frame is the whole packet: Ethernet + IPv4/IPv6 + UDP + the message
        hdr = {b"\x08\x00": 14 + 20 + 8, b"\x86\xdd": 14 + 40 + 8}
        assert sorted(f[hdr[f[12:14]]:] for f in got) == sorted(msgs)

        # no socket on the queue any more: back to the daemon's socket
        for q in range(nqueues):
            assert prog.clear_xsk(q) is True
        late = data(IDX, 100)
        probe.check([(4, PORT, late)], {"pass_data_no_xsk": 1}, delivered=[late])
    finally:
        for x in xsks:
            x.close()


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(host: netlab.Host) -> bytes:
    out = host.ip("-j", "link", "show", "dev", netlab.UNDERLAY_IF)
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


class Frames:
    """Hand-built Ethernet frames from a's ul0 to b's ul0 (AF_PACKET)."""

    def __init__(self, lab: netlab.Lab):
        self.eth = _mac(lab.b) + _mac(lab.a)
        self.src4 = socket.inet_aton(netlab.Lab.UNDERLAY4["a"])
        self.dst4 = socket.inet_aton(DST[4])
        self.src6 = socket.inet_pton(socket.AF_INET6, netlab.Lab.UNDERLAY6["a"])
        self.dst6 = socket.inet_pton(socket.AF_INET6, DST[6])

    @staticmethod
    def vlan(tags: list[tuple[int, int]]) -> bytes:
        """[(TPID, VID), ...] outermost first."""
        return b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in tags)

    def ipv4(self, payload: bytes, port: int = PORT, *, tags=(), options: bytes = b"",
             frag: int = 0, udp_len: int | None = None, proto: int = 17) -> bytes:
        udp = struct.pack("!HHHH", 40000, port, udp_len or 8 + len(payload), 0) + payload
        ihl = 5 + len(options) // 4
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(udp), 1, frag, 64,
                          proto, 0, self.src4, self.dst4) + options
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return self.eth + self.vlan(list(tags)) + b"\x08\x00" + hdr + udp

    def ipv6(self, payload: bytes, port: int = PORT, *, tags=(), hop_by_hop: bool = False
             ) -> bytes:
        ulen = 8 + len(payload)
        pseudo = self.src6 + self.dst6 + struct.pack("!IxxxB", ulen, 17)
        udp = struct.pack("!HHHH", 40000, port, ulen, 0) + payload
        csum = _csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        ext, nh = b"", 17
        if hop_by_hop:  # UDP behind a hop-by-hop header: only the fixed header is parsed
            ext, nh = bytes([17, 0, 1, 4, 0, 0, 0, 0]), 0
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + ulen, nh, 64, self.src6, self.dst6)
        return self.eth + self.vlan(list(tags)) + b"\x86\xdd" + hdr + ext + udp


@pytest.mark.privileged
def test_raw_frames_vlan_fragments_options(loaded) -> None:
    """VLAN tags (this kernel has no 8021q driver, so tags are injected by hand;
    VID 0 frames are still delivered by the stack), IPv4 fragments and options,
    IPv6 extension headers, truncated and non-IP frames."""
    lab, prog, probe = loaded
    f = Frames(lab)
    pkt = ns_socket(lab.a, socket.AF_PACKET, socket.SOCK_RAW)
    pkt.bind((netlab.UNDERLAY_IF, 0))
    q, ad = 0x8100, 0x88A8
    try:
        def check(frames: list[bytes], expect: dict[str, int], **kw) -> None:
            n = sum(expect.values())
            probe.check([], expect, frames=n, raw=(pkt, frames), **kw)

        init4, init6, init_ad = wg(1, 148), wg(1, 148), wg(1, 148)
        check([f.ipv4(init4, tags=[(q, 0)]), f.ipv6(init6, tags=[(q, 0)]),
               f.ipv4(init_ad, tags=[(ad, 0)]),
               f.ipv4(wg(8, 148), tags=[(q, 7)]), f.ipv6(wg(8, 148), tags=[(q, 7)]),
               f.ipv4(data(IDX, 3), tags=[(ad, 5)])],
              {"pass_initiation": 3, "drop_bad_type": 2, "drop_unknown_index": 1},
              delivered=[init4, init6, init_ad])
        # only one tag is parsed: QinQ's inner tag makes the frame "not ours", so it
        # reaches the daemon's socket unfiltered (the stack strips both VID-0 tags)
        qinq = wg(8, 148)
        check([f.ipv4(qinq, tags=[(ad, 0), (q, 0)])], {}, not_ours_min=1, delivered=[qinq])
        # IPv4 header options up to IHL 15
        opt4 = wg(1, 148)
        check([f.ipv4(opt4, options=b"\x01" * 4), f.ipv4(wg(8, 148), options=b"\x01" * 40)],
              {"pass_initiation": 1, "drop_bad_type": 1}, delivered=[opt4])
        # fragments: MF set (first fragment) or offset != 0 -> pass, whatever they hold
        check([f.ipv4(wg(8, 148), frag=0x2000), f.ipv4(wg(8, 148), frag=185),
               f.ipv4(wg(8, 148), frag=0x2000 | 185)], {"pass_fragment": 3})
        # truncated: UDP length beyond the frame, or too short for a message header
        check([f.ipv4(wg(1, 40), udp_len=8 + 148), f.ipv4(b"\x01\x00", udp_len=10),
               f.ipv4(wg(1, 148), udp_len=7)], {"drop_malformed": 3})
        # not ours: IPv6 extension header, other IP protocol, non-IP, runt frames
        # (the hop-by-hop one is valid, so the stack delivers it to the daemon's socket)
        hbh = wg(8, 148)
        check([f.ipv6(hbh, hop_by_hop=True), f.ipv4(wg(8, 148), proto=136),
               f.eth + b"\x88\xb5" + wg(8, 148), f.ipv4(b"")[:14 + 20 + 4],
               f.eth + b"\x08\x00", f.eth + b"\x86\xdd" + bytes(10), f.eth + b"\x81\x00\x00"],
              {}, not_ours_min=7, delivered=[hbh])
    finally:
        pkt.close()


@pytest.mark.privileged
def test_generic_mode_and_detach(lab: netlab.Lab) -> None:
    with XdpProgram().load(netlab.UNDERLAY_IF, PORT, mode="generic", netns=lab.b.name) as prog:
        assert prog.attach_mode == "generic"
        assert xdp_shown(lab.b)
        probe = Probe(lab, prog)
        try:
            init = wg(1, 148)
            probe.check([(4, PORT, init), (6, PORT, wg(4, 31)), (4, PORT, data(1, 2))],
                        {"pass_initiation": 1, "drop_bad_size": 1, "drop_unknown_index": 1},
                        delivered=[init], not_ours_min=0)
        finally:
            probe.close()
        assert prog.detach() is True
        assert prog.detach() is False  # idempotent
    assert not xdp_shown(lab.b)
    assert xdp.attached_programs(netlab.UNDERLAY_IF, lab.b.name) == {}


@pytest.mark.privileged
def test_detach_leaves_no_program(lab: netlab.Lab) -> None:
    had_bcc = "bcc" in sys.modules
    prog = XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns=lab.b.name)
    assert prog.attach_mode == "native" and xdp_shown(lab.b)
    assert prog.load_stats["compile_s"] > 0 and prog.load_stats["helper_maxrss_kb"] > 0
    # the caller never imported bcc/LLVM: the compile ran in the helper process
    assert had_bcc or "bcc" not in sys.modules
    assert prog.detach() is True
    assert not xdp_shown(lab.b)
    assert xdp.attached_programs(netlab.UNDERLAY_IF, lab.b.name) == {}
    assert prog.map_fds == {} and prog.attach_mode is None


_STALE_LOADER = """
import sys, time
from wgx.dataplane.xdp import XdpProgram
p = XdpProgram().load(sys.argv[1], int(sys.argv[2]))
print("READY", p.prog_id, p.attach_mode, flush=True)
time.sleep(120)
"""


@pytest.mark.privileged
def test_cleanup_stale_after_sigkill(lab: netlab.Lab) -> None:
    proc = lab.b.popen([sys.executable, "-c", _STALE_LOADER, netlab.UNDERLAY_IF, str(PORT)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    line = netlab._readline_with_timeout(proc, 60.0)
    if not line.startswith("READY"):
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"loader in netns did not start: {line!r}\n{err.decode(errors='replace')}")
    _, prog_id, mode = line.split()
    assert mode == "native"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    # the netlink attachment outlives the process
    assert xdp.attached_programs(netlab.UNDERLAY_IF, lab.b.name) == {
        "native": {"id": int(prog_id), "name": xdp.PROG_NAME}}
    assert xdp_shown(lab.b)
    # a new load refuses to clobber it (checked before compiling: fast)
    t0 = time.monotonic()
    with pytest.raises(XdpError) as ei:
        XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns=lab.b.name)
    assert ei.value.reason == "busy" and time.monotonic() - t0 < 2.0

    assert XdpProgram.cleanup_stale(netlab.UNDERLAY_IF, netns=lab.b.name) == [int(prog_id)]
    assert xdp.attached_programs(netlab.UNDERLAY_IF, lab.b.name) == {}
    assert not xdp_shown(lab.b)
    assert xdp.cleanup_stale(netlab.UNDERLAY_IF, netns=lab.b.name) == []


@pytest.mark.privileged
def test_clear_errors(lab: netlab.Lab, tmp_path: Path) -> None:
    ns = lab.b.name
    with pytest.raises(XdpError) as ei:
        XdpProgram().load("nosuch0", PORT, netns=ns)
    assert ei.value.reason == "no_such_interface" and "nosuch0" in str(ei.value)
    with pytest.raises(XdpError) as ei:
        XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns="wgxt-no-such-netns")
    assert ei.value.reason == "netns_missing"
    # an interpreter without site-packages cannot import bcc
    with pytest.raises(XdpError) as ei:
        XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns=ns, python=[sys.executable, "-S"])
    assert ei.value.reason == "bcc_missing" and "python3-bpfcc" in str(ei.value)
    # clang's diagnostics make it into the error
    bad = tmp_path / "bad.c"
    bad.write_text("int wgx_xdp(struct xdp_md *ctx) { return XDP_PASS }\n")
    with pytest.raises(XdpError) as ei:
        XdpProgram().load(netlab.UNDERLAY_IF, PORT, netns=ns, source=bad)
    assert ei.value.reason == "compile_failed" and "error" in str(ei.value)
    with pytest.raises(ValueError):
        XdpProgram().load(netlab.UNDERLAY_IF, PORT, mode="offload", netns=ns)
    # nothing was left attached by the failures
    assert xdp.attached_programs(netlab.UNDERLAY_IF, ns) == {}
