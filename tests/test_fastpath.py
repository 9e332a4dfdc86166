"""The XDP/AF_XDP fast path of wgx-userspace, end to end, against wireguard-go.

Host a runs ``wgx-userspace -f wg0`` with WGX_DATAPLANE=xdp on the lab's
2-queue veth ``ul0`` and 2 workers; host b runs wireguard-go.  The tests
prove that transport data really travels through XDP and the AF_XDP workers
(and not the daemon's UDP socket), that junk is dropped in XDP without costing
the daemon CPU, and that the fast path survives SIGKILL of the daemon or of a
worker, plus the ``xdp``/``auto`` fallback rules.

Independent witnesses used here, none of them wgx's own:
- nftables counters in b's namespace count the WireGuard type-4 datagrams b
  sends to a (output hook) and receives from a (input hook): a's own
  AF_PACKET taps cannot see frames XDP redirected, so b is where to count;
- the kernel's UDP MIB in a's namespace (datagrams the daemon's socket got);
- for each worker pid, its AF_XDP socket itself (taken with pidfd_getfd, then
  SO_DOMAIN and the XDP_STATISTICS socket option);
- ``ip -d link show ul0`` for the attached XDP program.

Steering: veth delivers a frame to the peer's RX queue with the number of the
TX queue it was sent on.  wireguard-go sends from one unconnected UDP socket,
so without help every datagram of the tunnel hashes (outer 5-tuple) to the
same TX queue of b, i.e. ONE RX queue/worker on a, however many TCP flows run
inside; the TUN's flow table then sends a's replies to the same worker.  The
accounting test therefore makes the spread deterministic with XPS on b
(cpu0 -> tx-0, cpu1 -> tx-1) and pins wireguard-go to one CPU per phase.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import netlab
import pytest

pytestmark = pytest.mark.privileged

WGX = ["wgx-userspace"]
WGGO = ["wireguard-go"]
WGGO_ENV = {"WG_PROCESS_FOREGROUND": "1"}
XDP_ENV = {"WGX_DATAPLANE": "xdp", "WGX_XDP_IFACE": netlab.UNDERLAY_IF, "WGX_WORKERS": "2",
           "LOG_LEVEL": "info"}
PORT_A = netlab.Lab.PORTS["a"]
MIB = 1 << 20
IP_UDP = 28  # IPv4 header (no options) + UDP header, the underlay is IPv4 here
MAX_MSG = 1420 + 32  # largest transport message at the tunnel MTU 1420

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438  # same number on x86_64 and the generic syscall table
_SOL_SOCKET, _SO_DOMAIN = 1, 39
_AF_XDP, _SOL_XDP, _XDP_STATISTICS = 44, 283, 7
_XDP_STATS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
              "rx_fill_ring_empty_descs", "tx_ring_empty_descs")


# ------------------------------------------------------------------ helpers

def wgx_get(h: netlab.Host, iface: str = "wg0") -> dict[str, str]:
    """All key=value lines of wgx's `get=wgx` answer (strings; see `ints`).

    The UAPI socket is a filesystem object, so the test connects to it directly.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(h.socket_path(iface)))
        s.sendall(b"get=wgx\n\n")
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    pairs = (ln.partition("=") for ln in buf.decode().splitlines() if "=" in ln)
    return {k: v for k, _, v in pairs}


def ints(st: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in st.items() if v.isdigit()}


def worker_pids(st: dict[str, str]) -> list[int]:
    return [int(p) for p in st.get("worker_pids", "").split(",") if p]


def wsum(st: dict[str, int], counter: str) -> int:
    """A worker counter summed over all workers."""
    return sum(v for k, v in st.items() if re.fullmatch(rf"worker\d+\.{counter}", k))


def settled_stats(h: netlab.Host, timeout: float = 5.0) -> dict[str, int]:
    """get=wgx once the workers' reports (every 50 ms) have caught up with XDP."""
    return netlab.wait_stable(lambda: ints(wgx_get(h)), timeout, 0.25, "wgx counters")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def af_xdp_sockets(pid: int) -> list[dict[str, int]]:
    """XDP_STATISTICS of every AF_XDP socket process `pid` holds (via pidfd_getfd).

    One entry per socket (several descriptors may refer to the same one).
    """
    out = []
    seen: set[str] = set()
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not link.startswith("socket:") or link in seen:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            try:
                dom, ln = ctypes.c_int(0), ctypes.c_uint32(4)
                if _libc.getsockopt(fd, _SOL_SOCKET, _SO_DOMAIN, ctypes.byref(dom),
                                    ctypes.byref(ln)) or dom.value != _AF_XDP:
                    continue
                seen.add(link)
                stats = (ctypes.c_uint64 * len(_XDP_STATS))()
                ln = ctypes.c_uint32(ctypes.sizeof(stats))
                assert _libc.getsockopt(fd, _SOL_XDP, _XDP_STATISTICS, stats,
                                        ctypes.byref(ln)) == 0, ctypes.get_errno()
                out.append(dict(zip(_XDP_STATS, stats, strict=True)))
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return out


def xdp_prog_ids(h: netlab.Host, dev: str = netlab.UNDERLAY_IF) -> list[int]:
    return [int(i) for i in re.findall(r"prog/xdp\w* id (\d+)", h.ip("-d", "link", "show", dev))]


def link_stat(h: netlab.Host, name: str, dev: str = netlab.UNDERLAY_IF) -> int:
    return int(h.run(["cat", f"/sys/class/net/{dev}/statistics/{name}"]).stdout)


def veth_drops(lab: netlab.Lab) -> int:
    """Frames the veth pair dropped, any direction (0 in a healthy run)."""
    return sum(link_stat(h, s) for h in (lab.a, lab.b) for s in ("rx_dropped", "tx_dropped"))


_NFT = """
table inet wgxfp {
    counter to_a {}
    counter from_a {}
    chain out {
        type filter hook output priority 0; policy accept;
        oifname "ul0" udp dport %(port)d @th,64,8 4 counter name "to_a"
    }
    chain in {
        type filter hook input priority 0; policy accept;
        iifname "ul0" udp sport %(port)d @th,64,8 4 counter name "from_a"
    }
}
"""


def nft_counters(h: netlab.Host) -> dict[str, tuple[int, int]]:
    """{name: (packets, bytes)} of the wgxfp table's named counters on `h`."""
    data = json.loads(h.run(["nft", "-j", "list", "counters", "table", "inet", "wgxfp"]).stdout)
    return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
            for c in data["nftables"] if "counter" in c}


def start_xdp_tunnel(lab: netlab.Lab) -> netlab.Tunnel:
    tun = lab.tunnel(WGX, WGGO, env_a=XDP_ENV, env_b=WGGO_ENV, establish=True)
    st = wgx_get(lab.a)
    assert st.get("dataplane") == "xdp", (st, lab.a.daemon_output())
    return tun


def configure_a(lab: netlab.Lab) -> None:
    """What Lab.tunnel() does for host a (the initiator), for a restarted daemon."""
    a, b = lab.a, lab.b
    a.wg("set", "wg0", "private-key", str(a.private_key_file), "listen-port", str(PORT_A),
         "peer", b.public_key, "endpoint", lab.endpoint_of(b, "v4", lab.PORTS["b"]),
         "allowed-ips", f"{lab.OVERLAY4['b']}/32,{lab.OVERLAY6['b']}/128")
    a.addr_add("wg0", f"{lab.OVERLAY4['a']}/24")
    a.addr_add("wg0", f"{lab.OVERLAY6['a']}/64")
    a.link_up("wg0", mtu=1420)


# ---------------------------------------------------------------- 1. accounting

def test_accounting_proves_af_xdp_carried_the_data(lab: netlab.Lab) -> None:
    tun = start_xdp_tunnel(lab)
    a, b = lab.a, lab.b
    st = wgx_get(a)
    assert st["workers"] == "2" and st["worker_restarts"] == "0"
    assert st["xdp_iface"] == "ul0" and st["xdp_attach_mode"] in ("native", "generic")
    daemon = a.daemon.pid
    assert int(st["pid"]) == daemon

    # A 2-worker pool is 2 live processes, children of the daemon, in a's netns,
    # each holding exactly one AF_XDP socket; the daemon itself holds none.
    pids = worker_pids(st)
    assert len(set(pids)) == 2 and daemon not in pids
    a_ns = os.stat(f"/run/netns/{a.name}").st_ino
    for pid in pids:
        assert alive(pid) and ppid(pid) == daemon
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == a_ns
        assert len(af_xdp_sockets(pid)) == 1, pid
    assert af_xdp_sockets(daemon) == []
    protocols = a.run(["cat", "/proc/net/protocols"]).stdout
    assert re.search(r"^XDP\s+\d+\s+2\s", protocols, re.M), protocols  # sockets in a's netns

    # Steer b's transmissions (= a's RX queues) with XPS: cpu N -> tx queue N.
    cpus = sorted(os.sched_getaffinity(0))[: netlab.UNDERLAY_QUEUES]
    steer = len(cpus) == netlab.UNDERLAY_QUEUES and cpus[-1] < 32
    if steer:
        for q, cpu in enumerate(cpus):
            b.run(["sh", "-c", f"echo {1 << cpu:x} > /sys/class/net/ul0/queues/tx-{q}/xps_cpus"])
    b.run(["nft", "-f", "-"], input=_NFT % {"port": PORT_A})

    def snapshot() -> dict:
        return {"wgx": settled_stats(a), "nft": nft_counters(b), "udp_a": lab.udp_counters(a),
                "wg_a": lab.peer_stats(a), "veth_drops": veth_drops(lab)}

    before = snapshot()
    per_phase = []
    for phase in range(2 if steer else 1):
        if steer:
            b.run(["taskset", "-a", "-p", f"{1 << cpus[phase]:x}", str(b.daemon.pid)])
        for src, dst in ((b, a), (a, b)):
            sent, received = lab.tcp_transfer_sha256(src, dst, tun.overlay4(dst), 10 * MIB)
            assert sent == received, f"{src.label}->{dst.label}: payload corrupted"
            assert lab.last_transfer["bytes_received"] == 10 * MIB
        per_phase.append(settled_stats(a))
    after = snapshot()
    w0, w1 = before["wgx"], after["wgx"]

    def d(key: str) -> int:
        return w1.get(key, 0) - w0.get(key, 0)

    to_a = [x - y for x, y in zip(after["nft"]["to_a"], before["nft"]["to_a"], strict=True)]
    from_a = [x - y for x, y in zip(after["nft"]["from_a"], before["nft"]["from_a"], strict=True)]
    udp = {k: after["udp_a"][k] - before["udp_a"][k] for k in after["udp_a"]}
    rx_bytes = after["wg_a"]["rx_bytes"] - before["wg_a"]["rx_bytes"]
    tx_bytes = after["wg_a"]["tx_bytes"] - before["wg_a"]["tx_bytes"]
    lost = after["veth_drops"] - before["veth_drops"]
    xsk_lost = sum(s["rx_dropped"] + s["rx_ring_full"]
                   for pid in worker_pids(wgx_get(a)) for s in af_xdp_sockets(pid))
    report = (f"\nb->a type-4 (nft): {to_a}, a->b type-4 (nft): {from_a}, veth drops {lost}, "
              f"xsk rx lost {xsk_lost}\nwgx deltas: "
              + str({k: d(k) for k in w1 if d(k)}) + f"\nudp(a) deltas {udp}, wg a rx/tx "
              f"{rx_bytes}/{tx_bytes}")
    print(report)
    # (40 MiB of TCP payload, both directions: tens of thousands of datagrams each way)
    assert to_a[0] > 15_000 and from_a[0] > 15_000, report

    # RX: every transport datagram b sent to a was redirected by XDP to an AF_XDP
    # socket (none fell back to the daemon's socket), and the workers read them all.
    assert d("xdp.pass_data_no_xsk") == 0, report
    assert d("xdp.redirect_data") + lost >= to_a[0] >= d("xdp.redirect_data"), report
    assert wsum(w1, "rx_packets") + xsk_lost == w1["xdp.redirect_data"], report
    for k in ("drop_unknown_index", "drop_bad_tag", "drop_replay", "drop_expired",
              "drop_allowedips_source", "drop_bad_inner", "drop_malformed"):
        assert wsum(w1, k) == 0, (k, report)
    # wg show on a counts exactly the WireGuard bytes b put on the wire (minus losses).
    payload_to_a = to_a[1] - IP_UDP * to_a[0]
    assert payload_to_a - (lost + xsk_lost) * MAX_MSG <= rx_bytes <= payload_to_a, report
    # The daemon's socket path saw no transport traffic at all: nothing reached its
    # UDP socket, and the engine dropped nothing.
    assert udp["in_datagrams"] == 0 and udp["in_errors"] == 0, report
    assert not [k for k in w1 if k.startswith("drop.") and d(k)], report

    # TX: what b received from a was sealed by the workers (AF_XDP TX ring, or the
    # raw-socket fallback); the daemon's UDP socket sent at most a keepalive.
    worker_tx = sum(d(f"worker{i}.{c}") for i in (0, 1) for c in ("tx_packets", "tx_raw"))
    assert udp["out_datagrams"] <= 2, report
    assert worker_tx + udp["out_datagrams"] >= from_a[0] >= worker_tx - lost, report
    payload_from_a = from_a[1] - IP_UDP * from_a[0]
    assert payload_from_a <= tx_bytes <= payload_from_a + lost * MAX_MSG, report

    if steer:
        # Phase 0 ran on b's tx-0 (a's worker 0), phase 1 on tx-1 (worker 1): both
        # workers decrypted and encrypted.
        p0, p1 = per_phase
        for i, (x, y) in enumerate(((w0, p0), (p0, p1))):
            rx = {j: y[f"worker{j}.rx_packets"] - x[f"worker{j}.rx_packets"] for j in (0, 1)}
            tx = {j: y[f"worker{j}.tx_packets"] - x[f"worker{j}.tx_packets"] for j in (0, 1)}
            assert rx[i] > 5_000 and rx[1 - i] == 0, (i, rx, report)
            assert tx[i] > 5_000, (i, tx, report)


# ------------------------------------------------------------- 2. junk flood

# Runs in b: the first type-4 datagram b sends to a's port with a UDP payload of
# exactly `size` bytes, as hex (AF_PACKET sees b's outgoing frames; a's own tap
# could not: XDP redirects them before any tap).
_CAPTURE = r"""
import socket, sys, time
port, size = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(("ul0", 0)); s.settimeout(0.2)
print("READY", flush=True)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        frame, addr = s.recvfrom(65535)
    except TimeoutError:
        continue
    if addr[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        continue
    udp = frame[14 + (frame[14] & 15) * 4:]
    if int.from_bytes(udp[2:4], "big") == port and udp[8] == 4 and len(udp) - 8 == size:
        print(udp[8:].hex(), flush=True)
        break
"""

# Runs in b: a bounded, paced flood of junk at a's listen port.  Every datagram's
# expected XDP verdict is worked out here with the rules of bpf/wgx_xdp.c; the
# counts sent per verdict are printed as JSON.
_FLOOD = r"""
import json, os, random, socket, sys, time
host, port, replay_hex = sys.argv[1], int(sys.argv[2]), sys.argv[3]
total, seconds = int(sys.argv[4]), float(sys.argv[5])
replay = bytes.fromhex(replay_hex)
known = int.from_bytes(replay[4:8], "little")
rnd = random.Random(1)

def verdict(d):
    if len(d) < 4:
        return "drop_malformed"
    if d[1] | d[2] | d[3]:
        return "drop_reserved"
    sizes = {1: 148, 2: 92, 3: 64}
    if d[0] in sizes:
        return "drop_bad_size" if len(d) != sizes[d[0]] else None
    if d[0] != 4:
        return "drop_bad_type"
    if len(d) < 32:
        return "drop_bad_size"
    return "drop_unknown_index" if int.from_bytes(d[4:8], "little") != known else None

def junk(kind):
    if kind == "random":
        return os.urandom(rnd.randrange(0, 1400))
    if kind == "short":
        return os.urandom(rnd.randrange(0, 4))
    if kind == "reserved":
        return bytes([4, rnd.randrange(1, 256), 0, 0]) + os.urandom(rnd.randrange(28, 200))
    if kind == "type":
        return bytes([rnd.choice([0, *range(5, 256)]), 0, 0, 0]) + os.urandom(rnd.randrange(0, 300))
    if kind == "size":
        t = rnd.randrange(1, 5)
        n = rnd.choice([rnd.randrange(4, 32), 147, 149, 91, 93, 63, 65, 200])
        return bytes([t, 0, 0, 0]) + os.urandom(n - 4)
    idx = known
    while idx == known:
        idx = rnd.getrandbits(32)
    return b"\x04\0\0\0" + idx.to_bytes(4, "little") + os.urandom(rnd.randrange(24, 1400))

pool = []
for kind in ("random", "short", "reserved", "type", "size", "index") * 300:
    d = junk(kind)
    v = verdict(d)
    if v is not None:
        pool.append((d, v))
pool += [(replay, "replay")] * (len(pool) // 6)
rnd.shuffle(pool)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
counts = {}
sent = 0
t0 = time.monotonic()
rate = total / seconds
while sent < total:
    now = time.monotonic()
    if now - t0 > seconds + 2:
        break
    if sent > (now - t0) * rate:
        time.sleep(0.001)
        continue
    for d, v in pool[sent % len(pool): sent % len(pool) + 64]:
        try:
            s.sendto(d, (host, port))
        except OSError:
            continue
        counts[v] = counts.get(v, 0) + 1
        sent += 1
print(json.dumps({"counts": counts, "sent": sent, "seconds": time.monotonic() - t0}))
"""

_NFT_PROBE = """
table inet wgxfp {
    counter probe {}
    chain in {
        type filter hook input priority 0; policy accept;
        iifname "wg0" ip length %(len)d icmp type echo-request counter name "probe"
    }
}
"""
JUNK_VERDICTS = ("drop_malformed", "drop_reserved", "drop_bad_type", "drop_bad_size",
                 "drop_unknown_index")
PROBE_SIZE = 777  # ICMP payload of the ping whose transport packet is replayed
# The captured packet: IPv4 20 + ICMP 8 + 777 = 805 B inner, padded to 816, + 32.
PROBE_WG_LEN = 16 + ((20 + 8 + PROBE_SIZE + 15) // 16) * 16 + 16


def test_junk_dropped_at_xdp_daemon_cpu_flat_tunnel_works(lab: netlab.Lab) -> None:
    tun = start_xdp_tunnel(lab)
    a, b = lab.a, lab.b
    daemon = a.daemon.pid
    # Witness on a: echo requests of the probe's size that reach a through the TUN.
    a.run(["nft", "-f", "-"], input=_NFT_PROBE % {"len": 20 + 8 + PROBE_SIZE})

    # One real transport packet b -> a (a probe ping), captured on b's wire.
    cap = b.popen([sys.executable, "-c", _CAPTURE, str(PORT_A), str(PROBE_WG_LEN)],
                  stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "READY"
    lab.ping(b, tun.overlay4(a), count=1, size=PROBE_SIZE)
    captured = bytes.fromhex(cap.communicate(timeout=15)[0].strip())
    assert captured[:4] == b"\x04\0\0\0" and len(captured) == PROBE_WG_LEN
    assert nft_counters(a)["probe"][0] == 1

    before = settled_stats(a)
    cpu0 = cpu_seconds(daemon)
    log0 = a.daemon_log.stat().st_size
    lost0 = veth_drops(lab)
    # A TCP upload b -> a (its data is a's RX, like the junk) runs through the flood.
    xfer = lab.start_tcp_transfer(b, a, tun.overlay4(a), 24 * MIB, timeout=40, rate_mbit=40)
    time.sleep(0.3)
    t0 = time.monotonic()
    flood = b.run([sys.executable, "-c", _FLOOD, a.underlay["v4"], str(PORT_A), captured.hex(),
                   "100000", "4"], timeout=30)
    flood_s = time.monotonic() - t0
    cpu = cpu_seconds(daemon) - cpu0
    running = xfer.running()
    sent_info = json.loads(flood.stdout)
    sent = sent_info["counts"]
    sha_sent, sha_received = xfer.wait()
    after = settled_stats(a)
    lost = veth_drops(lab) - lost0

    def d(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    report = (f"\nflood: {sent_info['sent']} datagrams in {sent_info['seconds']:.2f}s "
              f"({sent_info['sent'] / sent_info['seconds']:.0f}/s) {sent}\n"
              f"daemon CPU during the flood: {cpu:.3f}s over {flood_s:.2f}s; "
              f"veth drops {lost}; transfer still running at the end: {running}\n"
              + str({k: d(k) for k in after if d(k)}))
    print(report)
    assert sent_info["sent"] >= 50_000, report
    assert sha_sent == sha_received, report

    # Every junk datagram got its XDP drop verdict (the counts are exact unless the
    # veth itself dropped frames under load).
    for v in JUNK_VERDICTS:
        assert sent.get(v, 0) - lost <= d(f"xdp.{v}") <= sent.get(v, 0), (v, report)
        assert sent.get(v, 0) > 1000, (v, report)
    # Replays carry a known index: XDP drops them once the session's counter floor
    # has passed them, the workers' shared replay window catches the rest.
    replays = sent["replay"]
    caught = d("xdp.drop_stale_counter") + wsum(after, "drop_replay") - wsum(before, "drop_replay")
    assert replays - lost <= caught <= replays, report
    # ...and none reached a's TUN: the probe request arrived exactly once.
    assert nft_counters(a)["probe"][0] == 1, report
    # Nothing of it came to the daemon: no engine drops, no worker drops besides replays.
    assert not [k for k in after if k.startswith("drop.") and d(k)], report
    for k in ("drop_unknown_index", "drop_bad_tag", "drop_malformed", "drop_bad_inner",
              "drop_allowedips_source", "drop_expired"):
        assert wsum(after, k) == wsum(before, k), (k, report)
    assert d("xdp.pass_data_no_xsk") == 0, report
    assert cpu < 0.5, report
    grown = a.daemon_log.stat().st_size - log0
    assert grown < 1000, f"daemon log grew by {grown} B:\n{a.daemon_output()}"
    # The tunnel still works both ways.
    lab.ping(a, tun.overlay4(b), count=3)
    lab.ping(b, tun.overlay6(a), count=3)


# ------------------------------------------------------ 3. SIGKILL of the daemon

def test_daemon_sigkill_then_restart_leaves_one_program(lab: netlab.Lab) -> None:
    tun = start_xdp_tunnel(lab)
    a, b = lab.a, lab.b
    lab.ping(a, tun.overlay4(b), count=3)
    workers = worker_pids(wgx_get(a))
    assert len(workers) == 2
    old_ids = xdp_prog_ids(a)
    assert len(old_ids) == 1, a.ip("-d", "link", "show", "ul0")

    t0 = time.monotonic()
    a.daemon.send_signal(signal.SIGKILL)
    a.daemon.wait(timeout=5)
    # The workers die with it (PR_SET_PDEATHSIG), and with them the TUN's last queues.
    netlab.wait_until(lambda: not any(alive(p) for p in workers), timeout=2,
                      what="the workers to die with the daemon")
    workers_gone_s = time.monotonic() - t0
    netlab.wait_until(lambda: not a.link_exists("wg0"), timeout=2, what="wg0 to disappear")
    # XDP programs attached over netlink are kernel objects: the old one stays until
    # the next daemon removes it.
    assert xdp_prog_ids(a) in ([], old_ids)
    print(f"\nworkers gone {workers_gone_s:.3f}s after SIGKILL; program left: {xdp_prog_ids(a)}")

    a.start_daemon(WGX, "wg0", env=XDP_ENV)
    configure_a(lab)
    lab.ping(a, tun.overlay4(b), count=3, attempts=5)
    lab.ping(b, tun.overlay6(a), count=3)
    st = wgx_get(a)
    assert st["dataplane"] == "xdp" and st["workers"] == "2", st
    new_workers = worker_pids(st)
    assert len(new_workers) == 2 and all(alive(p) for p in new_workers)
    assert int(st["xdp.redirect_data"]) > 0 and int(st["xdp.pass_data_no_xsk"]) == 0, st
    new_ids = xdp_prog_ids(a)
    assert len(new_ids) == 1 and new_ids != old_ids, a.ip("-d", "link", "show", "ul0")

    # A normal stop detaches: nothing stays on ul0, no worker survives.
    assert a.stop_daemon() == 0, a.daemon_output()
    assert xdp_prog_ids(a) == [], a.ip("-d", "link", "show", "ul0")
    netlab.wait_until(lambda: not any(alive(p) for p in new_workers), timeout=2,
                      what="the workers to stop")
    assert not a.link_exists("wg0")


# ------------------------------------------------------ 4. SIGKILL of one worker

def test_worker_sigkill_is_restarted_and_tunnel_recovers(lab: netlab.Lab) -> None:
    tun = start_xdp_tunnel(lab)
    a, b = lab.a, lab.b
    lab.ping(a, tun.overlay4(b), count=3)
    st = ints(wgx_get(a))
    # Kill the worker that carries the tunnel (all of it hashes to one RX queue).
    busy = max((0, 1), key=lambda i: st[f"worker{i}.rx_packets"])
    assert st[f"worker{busy}.rx_packets"] > 0, st
    old = worker_pids(wgx_get(a))
    victim = old[busy]

    count, interval = 150, 0.01
    pinger = a.popen(["ping", "-n", "-D", "-i", str(interval), "-c", str(count), "-W", "1",
                      tun.overlay4(b)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    before = ints(wgx_get(a))
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    restarted = netlab.wait_until(
        lambda: (s := wgx_get(a)).get("worker_restarts") == "1" and s, timeout=2,
        interval=0.01, what="worker_restarts=1")
    restart_s = time.time() - t_kill
    out = pinger.communicate(timeout=count * interval + 10)[0]
    replies = {int(m.group(2)): float(m.group(1))
               for m in re.finditer(r"^\[([\d.]+)\] .*icmp_seq=(\d+) ", out, re.M)}
    lost = sorted(set(range(1, count + 1)) - set(replies))
    # Recovery: from the kill to the first reply after the last lost ping (to the
    # first reply after the kill if none was lost); and the longest silence.
    after_kill = sorted(t for seq, t in replies.items()
                        if t > t_kill and (not lost or seq > lost[-1]))
    assert after_kill, out
    recovery_s = after_kill[0] - t_kill
    times = sorted([t_kill, *replies.values()])
    silence_s = max(y - x for x, y in zip(times, times[1:], strict=False) if y > t_kill)
    gap = ints(wgx_get(a))
    print(f"\nworker {busy} (pid {victim}) killed: restart seen after {restart_s:.3f}s; "
          f"{len(lost)} of {count} pings lost; first reply {recovery_s:.3f}s after the kill; "
          f"longest silence {silence_s:.3f}s; datagrams the daemon's socket took over "
          f"meanwhile (xdp.pass_data_no_xsk): "
          f"{gap['xdp.pass_data_no_xsk'] - before['xdp.pass_data_no_xsk']}")

    new = worker_pids(restarted)
    assert len(new) == 2 and victim not in new and new[1 - busy] == old[1 - busy], (old, new)
    assert new[busy] != victim and alive(new[busy]) and not alive(victim)
    assert ppid(new[busy]) == a.daemon.pid and len(af_xdp_sockets(new[busy])) == 1
    assert restart_s < 1.0
    assert recovery_s < 1.0 and silence_s < 1.0, out

    # The new worker carries the tunnel again (not the daemon's socket fallback).
    settled = settled_stats(a)
    lab.ping(a, tun.overlay4(b), count=5)
    lab.ping(b, tun.overlay6(a), count=5)
    final = settled_stats(a)
    assert final[f"worker{busy}.rx_packets"] >= 10, final  # counts restart at 0
    assert final["xdp.pass_data_no_xsk"] == settled["xdp.pass_data_no_xsk"], final
    assert final["worker_restarts"] == 1


# -------------------------------------------------------------- 5. fallback

def test_xdp_unavailable_fails_and_auto_falls_back(lab: netlab.Lab) -> None:
    a = lab.a
    for iface, why in (("lo", "lo supports neither"), ("nosuch0", "nosuch0")):
        env = {**os.environ, "WGX_DATAPLANE": "xdp", "WGX_XDP_IFACE": iface}
        cp = netlab._run(a.uapi_wrap(["wgx-userspace", "-f", "wgfb0"]), check=False, env=env,
                         timeout=30)
        assert cp.returncode != 0, (cp.stdout, cp.stderr)
        assert "XDP" in cp.stderr and why in cp.stderr, cp.stderr
        assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr  # a message, no traceback
        print(f"\nWGX_XDP_IFACE={iface}: rc={cp.returncode}: {cp.stderr.strip()}")
        assert not a.link_exists("wgfb0") and not a.socket_path("wgfb0").exists()

    a.start_daemon(WGX, "wgfb0", env={"WGX_DATAPLANE": "auto", "WGX_XDP_IFACE": "lo",
                                      "LOG_LEVEL": "info"})
    st = netlab.wait_until(lambda: (s := wgx_get(a, "wgfb0")).get("fastpath_error") and s,
                           timeout=5, what="fastpath_error")
    assert st["dataplane"] == "socket" and st["dataplane_setting"] == "auto", st
    assert "lo" in st["fastpath_error"] and "XDP" in st["fastpath_error"], st
    assert "worker_pids" not in st
    print(f"auto on lo: fastpath_error={st['fastpath_error']}")
    assert st["fastpath_error"] in a.daemon_output(), a.daemon_output()  # logged once, too
    assert a.stop_daemon() == 0


# ------------------------------------------- 6. workers that crash on every packet

def test_crash_loop_auto_falls_back_to_sockets_and_says_why(lab: netlab.Lab) -> None:
    a, b = lab.a, lab.b
    env = {**XDP_ENV, "WGX_DATAPLANE": "auto", "WGX_TEST_WORKER_FAULT": "rx"}
    tun = lab.tunnel(WGX, WGGO, env_a=env, env_b=WGGO_ENV)
    assert wgx_get(a).get("dataplane") == "xdp", a.daemon_output()
    # Transport data reaches the workers' RX, where each batch crashes its worker.
    pinger = a.popen(["ping", "-n", "-i", "0.1", "-c", "80", "-W", "1", tun.overlay4(b)],
                     stdout=subprocess.PIPE, text=True)
    try:
        st = netlab.wait_until(lambda: (s := wgx_get(a)).get("dataplane") == "socket" and s,
                               timeout=20, what="the fallback to the socket dataplane")
    finally:
        pinger.kill()
        pinger.communicate()
    why = st["fastpath_error"]
    print(f"\nauto, a worker crashing on every RX batch: fastpath_error={why}")
    assert "socket dataplane took over" in why and "injected fault in rx" in why, st
    assert "worker_pids" not in st and st["dataplane_setting"] == "auto", st
    # The tunnel stays up, on the daemon's sockets, both ways.
    lab.ping(a, tun.overlay4(b), count=5)
    lab.ping(b, tun.overlay6(a), count=5)
    assert xdp_prog_ids(a) == []
    show = a.run(a.uapi_wrap(["wgx", "show", "wg0"])).stdout
    assert "dataplane: socket" in show and "injected fault in rx" in show, show
    log = a.daemon_output()
    assert log.count("Traceback") >= 3, log  # each crash logged with its traceback
    assert "worker 0 crashed" in log or "worker 1 crashed" in log, log
    assert "not restarting workers" in log, log
    assert a.stop_daemon() == 0


def test_crash_loop_xdp_exits_with_the_reason(lab: netlab.Lab) -> None:
    a, b = lab.a, lab.b
    env = {**XDP_ENV, "WGX_TEST_WORKER_FAULT": "tx"}
    tun = lab.tunnel(WGX, WGGO, env_a=env, env_b=WGGO_ENV)
    daemon = a.daemon
    assert daemon is not None and wgx_get(a).get("dataplane") == "xdp"
    # Every packet from a's TUN reaches a worker's TX, which crashes.
    pinger = a.popen(["ping", "-n", "-i", "0.1", "-c", "80", "-W", "1", tun.overlay4(b)],
                     stdout=subprocess.PIPE, text=True)
    try:
        rc = netlab.wait_until(lambda: daemon.poll(), timeout=20, interval=0.1,
                               what="the daemon to exit")
    finally:
        pinger.kill()
        pinger.communicate()
    log = a.daemon_output()
    print(f"\nxdp, a worker crashing on every TX batch: exit status {rc}; "
          f"{[ln for ln in log.splitlines() if 'fast path failed' in ln][:1]}")
    assert rc == 1, log
    assert "fast path failed: workers died 3 times" in log, log
    assert "injected fault in tx" in log and "Traceback" in log, log
    assert not a.link_exists("wg0") and xdp_prog_ids(a) == []


# ------------------------------------------- 7. a worker that is stopped, not dead

def test_a_stopped_worker_is_killed_and_restarted(lab: netlab.Lab) -> None:
    """A SIGSTOPped worker never acknowledges keypair removals, so their slots cannot be
    freed (and it may hold a slot's lock): after STUCK_AFTER s the pool kills it, and the
    restarted worker carries the tunnel again (issues 22 and 24)."""
    tun = start_xdp_tunnel(lab)
    a, b = lab.a, lab.b
    lab.ping(a, tun.overlay4(b), count=3)
    old = worker_pids(wgx_get(a))
    victim = old[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # Forget the peer's sessions: keypair removals the stopped worker cannot apply.
        a.wg("set", "wg0", "peer", b.public_key, "remove")
        a.wg("set", "wg0", "peer", b.public_key,
             "endpoint", lab.endpoint_of(b, "v4", lab.PORTS["b"]),
             "allowed-ips", f"{lab.OVERLAY4['b']}/32,{lab.OVERLAY6['b']}/128")
        st = ints(wgx_get(a))
        assert st["session_slots_retiring"] > 0, st
        restarted = netlab.wait_until(
            lambda: (s := wgx_get(a)).get("worker_restarts") == "1" and s, timeout=15,
            interval=0.1, what="the stopped worker to be restarted")
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    new = worker_pids(restarted)
    print(f"\nstopped worker {victim} killed and restarted after {took:.1f} s; "
          f"new pids {new}; last death: {restarted.get('worker_last_death')}")
    assert victim not in new and new[1] == old[1] and not alive(victim)
    assert 4.5 < took < 12
    assert "has not applied keypair removals" in a.daemon_output()
    lab.ping(a, tun.overlay4(b), count=5, attempts=10)
    st = netlab.wait_until(lambda: (s := ints(wgx_get(a)))["session_slots_retiring"] == 0 and s,
                           timeout=5, what="the retired slots to be freed")
    assert st["worker_restarts"] == 1, st
