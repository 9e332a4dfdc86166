"""TUN offloads against the real kernel: IFF_VNET_HDR + TUNSETOFFLOAD in a lab namespace.

The kernel must (1) accept the super-packets `coalesce` builds and deliver
their bytes to a socket, and (2) hand us TSO super-packets that `split_gso`
turns into valid segments.  To have a real TCP flow without a second stack,
the child process plays the remote peer by hand on the TUN: it answers the
three-way handshake, writes the coalesced data, and ACKs what the local server
sends back.

The test runs in a netlab host namespace; this file doubles as the child
script (`python tests/test_offload_tun.py v4|v6`, started with `Host.popen`).
The child prints one JSON line with everything it observed; the test only
asserts.  All child loops are bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the child needs wgx

from test_offload import ref_csum, ref_ip_ok, ref_l4_ok, ref_pseudo  # noqa: E402

from wgx.dataplane import offload  # noqa: E402

IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
TUNSETIFF = 0x400454CA
IFNAME = "wgxoff0"
MTU = 1420
PORT = 5201
PEER_PORT = 40000
CHILD_DEADLINE = 30.0
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ADDRS = {"v4": ("10.99.0.2", "10.99.0.1"), "v6": ("fd99::2", "fd99::1")}  # (peer, local)

# ======================================================================= child


class Peer:
    """The remote end of one TCP connection, spoken by hand through the TUN."""

    def __init__(self, fd: int, fam: str) -> None:
        self.fd = fd
        self.v6 = fam == "v6"
        self.src = socket.inet_pton(socket.AF_INET6 if self.v6 else socket.AF_INET, ADDRS[fam][0])
        self.dst = socket.inet_pton(socket.AF_INET6 if self.v6 else socket.AF_INET, ADDRS[fam][1])
        self.seq = 1_000_000
        self.ack = 0
        self.ts = 5000
        self.ts_echo = 0
        self.ipid = 1
        self.others: list[str] = []  # frames that were not our TCP flow (RS, MLD, ...)

    def packet(
        self,
        flags: int,
        payload: bytes = b"",
        opts: bytes | None = None,
        seq=None,
        win: int = 0xFFFF,
    ) -> bytes:
        """An IP/TCP packet from the peer with reference checksums."""
        if opts is None:
            opts = b"\x01\x01\x08\x0a" + struct.pack("!II", self.ts, self.ts_echo)
        seq = self.seq if seq is None else seq
        tcp = bytearray(
            struct.pack(
                "!HHIIBBHHH",
                PEER_PORT,
                PORT,
                seq,
                self.ack,
                ((20 + len(opts)) // 4) << 4,
                flags,
                win,
                0,
                0,
            )
            + opts
        )
        l4len = len(tcp) + len(payload)
        if self.v6:
            ip = bytearray(struct.pack("!IHBB", 6 << 28, l4len, 6, 64) + self.src + self.dst)
        else:
            ip = bytearray(
                struct.pack("!BBHHHBBH", 0x45, 0, 20 + l4len, self.ipid, 0x4000, 64, 6, 0)
                + self.src
                + self.dst
            )
            struct.pack_into("!H", ip, 10, ref_csum(bytes(ip)))
            self.ipid += 1
        struct.pack_into("!H", tcp, 16, ref_csum(ref_pseudo(bytes(ip), 6, l4len) + tcp + payload))
        return bytes(ip + tcp) + payload

    def write_plain(self, pkt: bytes) -> None:
        os.write(self.fd, offload.VNET_ZERO + pkt)

    def read_frame(self, deadline: float) -> bytes | None:
        """The next frame (virtio header + packet) of our flow, or None at the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if not r:
                continue
            frame = os.read(self.fd, 70000)
            pkt = frame[offload.VNET_HDR_LEN :]
            if self._ours(pkt):
                return frame
            self.others.append(pkt[:8].hex())

    def _ours(self, pkt: bytes) -> bool:
        if len(pkt) < 40 or pkt[0] >> 4 != (6 if self.v6 else 4):
            return False
        l4 = 40 if self.v6 else (pkt[0] & 15) * 4
        proto = pkt[6] if self.v6 else pkt[9]
        if proto != 6 or len(pkt) < l4 + 20:
            return False
        sport, dport = struct.unpack_from("!HH", pkt, l4)
        return (sport, dport) == (PORT, PEER_PORT)


def tcp_fields(pkt: bytes) -> dict:
    v6 = pkt[0] >> 4 == 6
    l4 = 40 if v6 else (pkt[0] & 15) * 4
    _, _, seq, ack, doff, flags, win = struct.unpack_from("!HHIIBBH", pkt, l4)
    hlen = l4 + (doff >> 4) * 4
    opts = pkt[l4 + 20 : hlen]
    tsval = None
    k = 0
    while k < len(opts):
        kind = opts[k]
        if kind == 0:
            break
        if kind == 1:
            k += 1
            continue
        if k + 1 >= len(opts) or opts[k + 1] < 2:
            break
        if kind == 8 and opts[k + 1] == 10:
            tsval = struct.unpack_from("!I", opts, k + 2)[0]
        k += opts[k + 1]
    return dict(seq=seq, ack=ack, flags=flags, win=win, payload=pkt[hlen:], tsval=tsval)


def snmp_tcp(field: str) -> int:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("Tcp:"):
            return int(dict(zip(names.split(), values.split(), strict=False))[field])
    return -1


def probe_offloads(fd: int) -> dict:
    """Which TUNSETOFFLOAD flag sets the kernel accepts (True, or the error)."""
    f = offload
    combos = {
        "CSUM": f.TUN_F_CSUM,
        "TSO4 without CSUM": f.TUN_F_TSO4,
        "CSUM|TSO4": f.TUN_F_CSUM | f.TUN_F_TSO4,
        "CSUM|TSO6": f.TUN_F_CSUM | f.TUN_F_TSO6,
        "CSUM|TSO4|TSO6": f.TUN_TCP_OFFLOADS,
        "CSUM|TSO_ECN": f.TUN_F_CSUM | f.TUN_F_TSO_ECN,
        "CSUM|TSO4|TSO6|TSO_ECN": f.TUN_TCP_OFFLOADS | f.TUN_F_TSO_ECN,
        "CSUM|UFO": f.TUN_F_CSUM | f.TUN_F_UFO,
        "CSUM|USO4": f.TUN_F_CSUM | f.TUN_F_USO4,
        "CSUM|USO6": f.TUN_F_CSUM | f.TUN_F_USO6,
        "CSUM|USO4|USO6": f.TUN_F_CSUM | f.TUN_UDP_OFFLOADS,
        "USO4|USO6 without CSUM": f.TUN_UDP_OFFLOADS,
        "CSUM|TSO4|TSO6|USO4|USO6": f.TUN_TCP_OFFLOADS | f.TUN_UDP_OFFLOADS,
        "unknown bit 0x80": f.TUN_F_CSUM | 0x80,
    }
    res = {}
    for name, flags in combos.items():
        try:
            fcntl.ioctl(fd, offload.TUNSETOFFLOAD, flags)
            res[name] = True
        except OSError as e:
            res[name] = e.strerror
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, offload.TUNSETOFFLOAD, 0)
    return res


def uso_roundtrip(peer: Peer, fam: str, deadline: float) -> dict:
    """A UDP_SEGMENT send from a local socket must reach us as one UDP_L4 frame."""
    af = socket.AF_INET6 if fam == "v6" else socket.AF_INET
    peer_addr, local_addr = ADDRS[fam]
    u = socket.socket(af, socket.SOCK_DGRAM)
    u.bind((local_addr, 6000))
    u.setsockopt(socket.IPPROTO_UDP, 103, 1200)  # UDP_SEGMENT
    data = random.Random(9).randbytes(5 * 1200 + 77)
    u.sendto(data, (peer_addr, 7000))
    u.close()
    res: dict = {}
    while time.monotonic() < deadline:
        r, _, _ = select.select([peer.fd], [], [], 0.5)
        if not r:
            continue
        frame = os.read(peer.fd, 70000)
        pkt = frame[offload.VNET_HDR_LEN :]
        l4 = 40 if pkt[0] >> 4 == 6 else 20
        if len(pkt) < l4 + 8 or (pkt[6] if l4 == 40 else pkt[9]) != 17:
            continue
        res["vnet"] = offload.parse_vnet_hdr(frame)._asdict()
        res["frame_len"] = len(pkt)
        segs = [bytes(s) for s in offload.split_gso(frame, MTU)]
        res["segments"] = len(segs)
        res["segments_ok"] = all(
            ref_l4_ok(s) and (l4 == 40 or ref_ip_ok(s)) and len(s) <= MTU for s in segs
        )
        res["data_ok"] = b"".join(s[l4 + 8 :] for s in segs) == data
        break
    return res


def child(fam: str) -> dict:
    deadline = time.monotonic() + CHILD_DEADLINE
    out: dict = {"family": fam}
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    ifr = struct.pack("16sH22x", IFNAME.encode(), IFF_TUN | IFF_NO_PI | offload.IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    hdrsz = bytearray(4)
    fcntl.ioctl(fd, offload.TUNGETVNETHDRSZ, hdrsz)
    out["vnet_hdr_sz"] = struct.unpack("i", hdrsz)[0]
    out["probe"] = probe_offloads(fd)
    out["offload_flags"] = offload.set_tun_offload(fd)
    peer_addr, local_addr = ADDRS[fam]
    plen = 64 if fam == "v6" else 24
    extra = ["nodad"] if fam == "v6" else []
    subprocess.run(["ip", "addr", "add", f"{local_addr}/{plen}", "dev", IFNAME, *extra], check=True)
    subprocess.run(["ip", "link", "set", IFNAME, "mtu", str(MTU), "up"], check=True)
    try:  # for the report only
        out["features"] = subprocess.run(
            ["ethtool", "-k", IFNAME], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[1:12]
    except (OSError, subprocess.TimeoutExpired) as e:
        out["features"] = [repr(e)]
    af = socket.AF_INET6 if fam == "v6" else socket.AF_INET
    srv = socket.socket(af, socket.SOCK_STREAM)
    srv.bind((local_addr, PORT))
    srv.listen(1)
    peer = Peer(fd, fam)
    csum_errors0 = snmp_tcp("InCsumErrors")
    mss = MTU - (60 if fam == "v6" else 40)

    # -- handshake: SYN (MSS, timestamps, window scale 7), read SYN-ACK, ACK
    syn_opts = (
        struct.pack("!BBH", 2, 4, mss)
        + b"\x01\x01\x08\x0a"
        + struct.pack("!II", peer.ts, 0)
        + b"\x01\x03\x03\x07"
    )
    peer.write_plain(peer.packet(SYN, opts=syn_opts))
    frame = peer.read_frame(deadline)
    assert frame is not None, "no SYN-ACK"
    hdr = offload.parse_vnet_hdr(frame)
    out["synack_vnet"] = hdr._asdict()
    stats = offload.OffloadStats()
    pkts = offload.split_gso(frame, MTU, stats)
    synack = bytes(pkts[0])
    out["synack_csum_ok"] = ref_l4_ok(synack) and (fam == "v6" or ref_ip_ok(synack))
    f = tcp_fields(synack)
    assert f["flags"] == SYN | ACK, f
    out["synack_window"] = f["win"]
    peer.seq += 1
    peer.ack = (f["seq"] + 1) & 0xFFFFFFFF
    server_isn = f["seq"]
    peer.ts_echo = f["tsval"] or 0
    peer.ts += 1
    peer.write_plain(peer.packet(ACK))
    srv.settimeout(max(0.1, deadline - time.monotonic()))
    conn, _ = srv.accept()
    conn.settimeout(max(0.1, deadline - time.monotonic()))

    # -- write path: 40 KB as MSS-sized segments, written (a) one by one with zero
    # headers and (b) coalesced into one super-packet; twice each, alternating.
    seg_payload = mss - 12  # the timestamp option takes 12 bytes of every segment
    total = 40_000
    out["write_rounds"] = []
    for rnd, mode in enumerate(["single", "coalesced", "single", "coalesced"]):
        data = random.Random(rnd).randbytes(total)
        peer.ts += 1
        segs = []
        for off in range(0, total, seg_payload):
            chunk = data[off : off + seg_payload]
            last = off + seg_payload >= total
            segs.append(peer.packet(ACK | (PSH if last else 0), chunk, seq=peer.seq + off))
        t0 = time.perf_counter()
        bufs = offload.coalesce(segs, stats=stats) if mode == "coalesced" else None
        t1 = time.perf_counter()
        if bufs is None:
            bufs = [offload.VNET_ZERO + sg for sg in segs]
        written = [os.write(fd, b) for b in bufs]
        t2 = time.perf_counter()
        peer.seq = (peer.seq + total) & 0xFFFFFFFF
        got = b""
        while len(got) < total and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
        # The kernel's ACKs: one super-packet should draw one ACK, 30 segments ~15.
        acks = []
        ack_deadline = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < ack_deadline:
            fr = peer.read_frame(ack_deadline)
            if fr is None:
                break
            acks.append(tcp_fields(bytes(offload.split_gso(fr, MTU)[0]))["ack"])
            if acks[-1] == peer.seq:
                break
        out["write_rounds"].append(
            dict(
                mode=mode,
                segments=len(segs),
                writes=len(bufs),
                written=written,
                lens=[len(b) for b in bufs],
                vnet=offload.parse_vnet_hdr(bufs[0])._asdict(),
                coalesce_us=round((t1 - t0) * 1e6, 1),
                write_us=round((t2 - t1) * 1e6, 1),
                server_received=len(got),
                server_data_ok=got == data,
                acks_seen=len(acks),
                final_ack_ok=bool(acks) and acks[-1] == peer.seq,
            )
        )

    # -- F_DATA_VALID on write: does the tun driver honour it?  A segment with a
    # wrong TCP checksum flagged DATA_VALID: if it is ignored, the kernel drops it.
    errs0 = snmp_tcp("InCsumErrors")
    bad = bytearray(peer.packet(ACK | PSH, b"corrupt!"))
    bad[-1] ^= 0xFF
    os.write(fd, offload.pack_vnet_hdr(offload.VIRTIO_NET_HDR_F_DATA_VALID) + bytes(bad))
    conn.settimeout(0.3)
    try:
        leaked = conn.recv(100)
    except TimeoutError:
        leaked = b""
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    out["data_valid_bad_csum_delivered"] = leaked != b""
    out["data_valid_bad_csum_counted"] = snmp_tcp("InCsumErrors") - errs0
    csum_errors0 = snmp_tcp("InCsumErrors")

    # -- read path: the server sends 512 KB; we split its TSO frames and ACK them
    send_total = 512 * 1024
    sdata = random.Random(8).randbytes(send_total)
    sender = threading.Thread(target=lambda: conn.sendall(sdata), daemon=True)
    sender.start()
    recv = bytearray(send_total)
    have = 0  # contiguous bytes received
    base = (server_isn + 1) & 0xFFFFFFFF
    frames = gso_frames = max_frame = max_segs = bad = 0
    gso_types = set()
    seg_sizes = set()
    while have < send_total and time.monotonic() < deadline:
        fr = peer.read_frame(deadline)
        if fr is None:
            break
        h = offload.parse_vnet_hdr(fr)
        frames += 1
        gso_types.add(h.gso_type)
        segs_out = [bytes(s) for s in offload.split_gso(fr, MTU, stats)]
        if h.gso_type != offload.VIRTIO_NET_HDR_GSO_NONE:
            gso_frames += 1
            max_frame = max(max_frame, len(fr) - offload.VNET_HDR_LEN)
            max_segs = max(max_segs, len(segs_out))
        for s in segs_out:
            if not (ref_l4_ok(s) and (fam == "v6" or ref_ip_ok(s))) or len(s) > MTU:
                bad += 1
                continue
            t = tcp_fields(s)
            seg_sizes.add(len(t["payload"]))
            off = (t["seq"] - base) & 0xFFFFFFFF
            if off <= have and t["payload"]:
                end = min(send_total, off + len(t["payload"]))
                recv[off:end] = t["payload"][: end - off]
                have = max(have, end)
            if t["tsval"] is not None:
                peer.ts_echo = t["tsval"]
        peer.ack = (base + have) & 0xFFFFFFFF
        peer.ts += 1
        peer.write_plain(peer.packet(ACK))
    out.update(
        read_frames=frames,
        read_gso_frames=gso_frames,
        read_max_frame=max_frame,
        read_max_segments=max_segs,
        read_bad_segments=bad,
        read_bytes=have,
        read_data_ok=bytes(recv) == sdata,
        read_gso_types=sorted(gso_types),
        read_seg_payload_sizes=sorted(seg_sizes)[-3:],
    )
    if out["offload_flags"] & offload.TUN_UDP_OFFLOADS:
        out["uso"] = uso_roundtrip(peer, fam, deadline)
    out["stats"] = stats.as_dict()
    out["in_csum_errors"] = snmp_tcp("InCsumErrors") - csum_errors0
    out["other_frames"] = len(peer.others)
    # Tear the connection down (RST) so nothing lingers; the namespace goes anyway.
    peer.write_plain(peer.packet(RST | ACK))
    conn.close()
    srv.close()
    return out


# ======================================================================= tests


def run_child(host, fam: str) -> dict:
    proc = host.popen(
        [sys.executable, str(Path(__file__).resolve()), fam],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = proc.communicate(timeout=CHILD_DEADLINE + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"child timed out; stderr:\n{stderr.decode(errors='replace')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"child rc={proc.returncode}; stderr:\n{stderr.decode(errors='replace')[-4000:]}"
        )
    return json.loads(stdout.decode().strip().splitlines()[-1])


@pytest.mark.privileged
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_kernel_accepts_coalesced_writes_and_emits_tso(lab, fam, capsys):
    res = run_child(lab.a, fam)
    with capsys.disabled():
        print(f"\n[{fam}] " + json.dumps(res, indent=1, sort_keys=True))
    # Setup: a 10-byte header; CSUM|TSO4|TSO6 are required, USO where the kernel has it.
    assert res["vnet_hdr_sz"] == 10
    assert res["offload_flags"] & offload.TUN_TCP_OFFLOADS == offload.TUN_TCP_OFFLOADS
    assert res["probe"]["CSUM|TSO4|TSO6"] is True
    assert res["probe"]["TSO4 without CSUM"] is not True  # TSO needs checksum offload
    # The kernel's own packets come with NEEDS_CSUM; split_gso completes them.
    assert res["synack_vnet"]["flags"] & offload.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert res["synack_csum_ok"]
    # Write path: all segments became one super-packet, which the kernel took whole.
    gso = offload.VIRTIO_NET_HDR_GSO_TCPV6 if fam == "v6" else offload.VIRTIO_NET_HDR_GSO_TCPV4
    for rnd in res["write_rounds"]:
        assert rnd["server_received"] == 40_000 and rnd["server_data_ok"], rnd
        assert rnd["final_ack_ok"] and rnd["written"] == rnd["lens"], rnd
        if rnd["mode"] == "coalesced":
            assert rnd["segments"] > 20 and rnd["writes"] == 1, rnd
            assert rnd["vnet"]["gso_type"] == gso and rnd["vnet"]["flags"] == 1, rnd
            assert rnd["acks_seen"] <= 3, rnd  # one receive: not an ACK per two segments
        else:
            assert rnd["vnet"] == dict.fromkeys(rnd["vnet"], 0), rnd
    assert res["in_csum_errors"] == 0
    # The tun driver ignores F_DATA_VALID: a bad checksum is still caught.
    assert not res["data_valid_bad_csum_delivered"]
    assert res["data_valid_bad_csum_counted"] == 1
    # Read path: TSO super-packets arrive and split into valid MTU-sized segments.
    assert res["read_data_ok"] and res["read_bytes"] == 512 * 1024
    assert res["read_bad_segments"] == 0
    assert gso in res["read_gso_types"] and res["read_gso_frames"] > 0
    assert res["read_max_frame"] > 16 * 1024 and res["read_max_segments"] > 10
    assert res["stats"]["split_dropped"] == 0
    # USO (Linux >= 6.2, USO4 and USO6 only together): a UDP_SEGMENT send arrives as
    # one UDP_L4 super-packet and splits into the original datagrams.
    if res["probe"]["CSUM|USO4|USO6"] is True:
        assert res["offload_flags"] & offload.TUN_UDP_OFFLOADS == offload.TUN_UDP_OFFLOADS
        uso = res["uso"]
        assert uso["vnet"]["gso_type"] == offload.VIRTIO_NET_HDR_GSO_UDP_L4
        assert uso["vnet"]["gso_size"] == 1200 and uso["segments"] == 6
        assert uso["segments_ok"] and uso["data_ok"]


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1])), flush=True)
