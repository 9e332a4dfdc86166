"""Link-layer headers for packets we put on the wire ourselves (AF_XDP TX).

`NextHops.header(endpoint)` returns the Ethernet + IPv4 + UDP header template
for sending to `endpoint` out of the XDP interface, built from the kernel's
route and neighbour tables through pyroute2 and cached for a second (a moved
source address is picked up within it).  Only an endpoint's first lookup runs
on the packet path: after that `header` answers from the cache and notes the
stale entries, and the worker calls `refresh` when it has been idle for a few
ms, or once an entry is `CACHE_SECONDS` overdue (a lookup opens a netlink
socket: 1-3.5 ms when its code is cold, which a ping hit once a second).
It returns None when the path does not leave through that interface, the
neighbour is not resolved yet, or the endpoint is IPv6 (TX over AF_XDP is
IPv4 only for now); the caller then sends through the kernel, which resolves
neighbours, fragments and checksums.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from pyroute2 import IPRoute

CACHE_SECONDS = 1.0  # how long a source address or neighbour may be stale after a change
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT
ETH_IPV4 = b"\x08\x00"
HEADER_LEN = 14 + 20 + 8


class Template:
    """A prebuilt Ethernet/IPv4/UDP header; `header` sets its lengths and IP checksum."""

    __slots__ = ("bytes", "partial")

    def __init__(self, src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes,
                 sport: int, dport: int) -> None:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, 17, 0, src_ip, dst_ip)
        udp = struct.pack("!HHHH", sport, dport, 0, 0)
        self.bytes = dst_mac + src_mac + ETH_IPV4 + ip + udp
        words = struct.unpack("!10H", ip)
        self.partial = sum(words)  # IP header sum without total length

    def header(self, payload_len: int) -> bytes:
        """The header for a UDP payload of `payload_len` bytes (lengths and IP checksum set)."""
        total = 28 + payload_len
        s = self.partial + total
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        h = bytearray(self.bytes)
        struct.pack_into("!H", h, 16, total)
        struct.pack_into("!H", h, 24, ~s & 0xFFFF)
        struct.pack_into("!H", h, 38, payload_len + 8)
        return bytes(h)


class NextHops:
    def __init__(self, ifname: str, listen_port: int) -> None:
        self.ifname = ifname
        self.ifindex = socket.if_nametoindex(ifname)
        self.listen_port = listen_port
        self._cache: dict[tuple[str, int], tuple[float, Template | None]] = {}
        self.stale: dict[tuple[str, int], float] = {}  # cached too long -> when first noted
        with IPRoute() as ipr:
            msg = ipr.link("get", index=self.ifindex)[0]
        self._mac = bytes.fromhex(msg.get_attr("IFLA_ADDRESS").replace(":", ""))

    def header(self, endpoint: tuple[str, int], now: float | None = None) -> Template | None:
        """The template for `endpoint` (None: send through the kernel).  Looked up now only
        the first time; a cached one older than CACHE_SECONDS is still used, and noted in
        `stale` for `refresh`."""
        now = time.monotonic() if now is None else now
        hit = self._cache.get(endpoint)
        if hit is not None:
            if now - hit[0] >= CACHE_SECONDS:
                self.stale.setdefault(endpoint, now)
            return hit[1]
        tpl = self._resolve(endpoint)
        self._cache[endpoint] = (now, tpl)
        return tpl

    def overdue(self, now: float) -> bool:
        """Whether an entry has been stale for CACHE_SECONDS (refresh it even if busy)."""
        return bool(self.stale) and now - min(self.stale.values()) >= CACHE_SECONDS

    def refresh(self, now: float | None = None) -> None:
        """Look up again the endpoints `header` found stale."""
        now = time.monotonic() if now is None else now
        for endpoint in self.stale:
            self._cache[endpoint] = (now, self._resolve(endpoint))
        self.stale.clear()

    def invalidate(self) -> None:
        """Forget every template: the next `header` for an endpoint looks it up."""
        self._cache.clear()
        self.stale.clear()

    def _resolve(self, endpoint: tuple[str, int]) -> Template | None:
        host, port = endpoint
        addr = ipaddress.ip_address(host)
        if addr.version != 4:
            return None
        # A fresh netlink socket per lookup (~1 ms, once per CACHE_SECONDS): a
        # long-lived pyroute2 0.9 IPRoute keeps ~1 KB per request (measured), which
        # grew a worker by ~0.3 MB per minute.
        with IPRoute() as ipr:
            try:
                route = ipr.route("get", dst=host)[0]
            except Exception:
                return None
            if route.get_attr("RTA_OIF") != self.ifindex:
                return None
            neighbours = ipr.get_neighbours(ifindex=self.ifindex, family=socket.AF_INET)
        src = route.get_attr("RTA_PREFSRC")
        hop = route.get_attr("RTA_GATEWAY") or host
        if src is None:
            return None
        for neigh in neighbours:
            if neigh.get_attr("NDA_DST") == hop and neigh["state"] & NUD_USABLE:
                lladdr = neigh.get_attr("NDA_LLADDR")
                if lladdr:
                    dst_mac = bytes.fromhex(lladdr.replace(":", ""))
                    return Template(self._mac, dst_mac, addr.__class__(src).packed,
                                    addr.packed, self.listen_port, port)
        return None

    def close(self) -> None:
        """Nothing to release: every lookup opens and closes its own netlink socket."""
