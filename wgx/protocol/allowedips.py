"""Allowed-IPs table: longest-prefix match over IPv4 and IPv6, prefix -> opaque value.

Contract (same semantics as kernel WireGuard's allowedips.c):
- `insert` masks host bits off (10.0.0.1/24 is stored as 10.0.0.0/24); inserting a
  prefix that already exists moves it to the new value.
- `remove(prefix, value)` removes that exact prefix only if it maps to `value`;
  `remove_value` removes every prefix of `value`. Values are compared by identity.
- `lookup*` returns the value of the longest prefix containing the address, or None.
  IPv4 and IPv6 are separate tables: a v4 /0 never matches a v6 address and vice
  versa, and IPv4-mapped IPv6 addresses are looked up as IPv6.
- `lookup_packet_dst/src` read the version nibble and the raw address from an IP
  header; short or non-IP input gives None, never an exception.

Pure data structure: no I/O, no locking. Lookups are O(number of distinct prefix
lengths present) dict probes, which beats a bitwise trie walk in pure Python.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

__all__ = ["AllowedIPs", "Network", "AddressLike"]

T = TypeVar("T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressLike = bytes | bytearray | memoryview | str | ipaddress.IPv4Address | ipaddress.IPv6Address


class _Family(Generic[T]):
    """One address family: {prefixlen: {addr >> (bits - prefixlen): value}}."""

    __slots__ = ("bits", "tables", "order")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        # (shift, table) pairs for present prefix lengths, longest prefix first.
        self.order: list[tuple[int, dict[int, T]]] = []

    def rebuild(self) -> None:
        bits = self.bits
        self.order = [
            (bits - plen, self.tables[plen]) for plen in sorted(self.tables, reverse=True)
        ]

    def lookup(self, addr: int) -> T | None:
        for shift, table in self.order:
            value = table.get(addr >> shift)
            if value is not None:
                return value
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())


class AllowedIPs(Generic[T]):
    """Longest-prefix-match table for IPv4 and IPv6 mapping prefixes to values."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    # --- mutation -------------------------------------------------------------------------

    @staticmethod
    def _parse(network: str | Network) -> Network:
        if isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return network
        return ipaddress.ip_network(network, strict=False)

    def _locate(self, network: str | Network) -> tuple[_Family[T], int, int]:
        net = self._parse(network)
        fam = self._v4 if net.version == 4 else self._v6
        plen = net.prefixlen
        return fam, plen, int(net.network_address) >> (fam.bits - plen)

    def insert(self, network: str | Network, value: T) -> None:
        """Map `network` (host bits masked off) to `value`, replacing any previous owner."""
        if value is None:
            raise ValueError("AllowedIPs values must not be None")
        fam, plen, key = self._locate(network)
        table = fam.tables.get(plen)
        if table is None:
            table = fam.tables[plen] = {}
            table[key] = value
            fam.rebuild()
        else:
            table[key] = value

    def remove(self, network: str | Network, value: T) -> bool:
        """Remove `network` if it currently maps to `value` (by identity)."""
        fam, plen, key = self._locate(network)
        table = fam.tables.get(plen)
        if table is None or table.get(key) is not value:
            return False
        del table[key]
        if not table:
            del fam.tables[plen]
            fam.rebuild()
        return True

    def remove_value(self, value: T) -> None:
        """Remove every prefix that maps to `value` (by identity)."""
        for fam in (self._v4, self._v6):
            emptied = False
            for plen, table in list(fam.tables.items()):
                dead = [k for k, v in table.items() if v is value]
                for k in dead:
                    del table[k]
                if dead and not table:
                    del fam.tables[plen]
                    emptied = True
            if emptied:
                fam.rebuild()

    def clear(self) -> None:
        """Remove everything."""
        self._v4 = _Family(32)
        self._v6 = _Family(128)

    # --- lookup ---------------------------------------------------------------------------

    def lookup(self, addr: AddressLike) -> T | None:
        """Value of the longest prefix containing `addr` (4/16 raw bytes, str or address)."""
        if isinstance(addr, bytes | bytearray | memoryview):
            n = len(addr)
            if n == 4:
                return self._v4.lookup(int.from_bytes(addr, "big"))
            if n == 16:
                return self._v6.lookup(int.from_bytes(addr, "big"))
            raise ValueError(f"raw address must be 4 or 16 bytes, got {n}")
        ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
        fam = self._v4 if ip.version == 4 else self._v6
        return fam.lookup(int(ip))

    def lookup_packet_dst(self, ip_packet: bytes | bytearray | memoryview) -> T | None:
        """Peer for an outgoing packet: LPM on the IP destination address."""
        return self._lookup_packet(ip_packet, 16, 24)

    def lookup_packet_src(self, ip_packet: bytes | bytearray | memoryview) -> T | None:
        """Owner of a decrypted packet's source address (ingress source check)."""
        return self._lookup_packet(ip_packet, 12, 8)

    def _lookup_packet(self, ip_packet: bytes | bytearray | memoryview, v4_off: int,
                       v6_off: int) -> T | None:
        """LPM on the address at `v4_off` (IPv4) or `v6_off` (IPv6); None for non-IP."""
        if not ip_packet:
            return None
        version = ip_packet[0] >> 4
        if version == 4:
            if len(ip_packet) < 20:
                return None
            return self._v4.lookup(int.from_bytes(ip_packet[v4_off : v4_off + 4], "big"))
        if version == 6:
            if len(ip_packet) < 40:
                return None
            return self._v6.lookup(int.from_bytes(ip_packet[v6_off : v6_off + 16], "big"))
        return None

    # --- introspection --------------------------------------------------------------------

    def entries(self, value: T) -> list[Network]:
        """Prefixes of `value`: v4 first, then v6, each by address then prefix length."""
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for plen, table in self._v4.tables.items():
            shift = 32 - plen
            v4.extend(
                ipaddress.IPv4Network((k << shift, plen)) for k, v in table.items() if v is value
            )
        for plen, table in self._v6.tables.items():
            shift = 128 - plen
            v6.extend(
                ipaddress.IPv6Network((k << shift, plen)) for k, v in table.items() if v is value
            )
        v4.sort(key=lambda n: (int(n.network_address), n.prefixlen))
        v6.sort(key=lambda n: (int(n.network_address), n.prefixlen))
        return [*v4, *v6]

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)
