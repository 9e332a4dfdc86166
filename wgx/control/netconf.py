"""Host network configuration through pyroute2: links, addresses, routes, rules.

`NetConf` wraps one rtnetlink socket, in the current network namespace or in
a named one (`/run/netns/NAME`). Every change wgx makes to a host goes
through here, so it can be listed, undone and tested; nothing shells out to
`ip`. Methods raise `NetConfError` with the operation and the kernel's
reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

FIB_RULE_INVERT = 0x2
AF_INET, AF_INET6 = 2, 10
IN6_ADDR_GEN_MODE_NONE = 1
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetConfError(RuntimeError):
    pass


def _family(version: int) -> int:
    return AF_INET if version == 4 else AF_INET6


class NetConf:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        try:
            self.ipr: IPRoute = NetNS(netns) if netns else IPRoute()
        except (OSError, NetlinkError) as e:
            raise NetConfError(f"cannot open network namespace {netns!r}: {e}") from None

    def __enter__(self) -> NetConf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ipr.close()

    def _do(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except NetlinkError as e:
            raise NetConfError(f"{what}: {e.args[1] if len(e.args) > 1 else e}") from None

    # ---- links

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def require_index(self, name: str) -> int:
        idx = self.link_index(name)
        if idx is None:
            raise NetConfError(f"interface {name} does not exist"
                               + (f" in namespace {self.netns}" if self.netns else ""))
        return idx

    def link_info(self, name: str) -> dict[str, Any]:
        idx = self.require_index(name)
        msg = self.ipr.link("get", index=idx)[0]
        return {
            "index": idx,
            "mtu": msg.get_attr("IFLA_MTU"),
            "up": bool(msg["flags"] & 1),
            "operstate": msg.get_attr("IFLA_OPERSTATE"),
        }

    def set_link(self, name: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        idx = self.require_index(name)
        kw: dict[str, Any] = {}
        if mtu is not None:
            kw["mtu"] = mtu
        if up is not None:
            kw["state"] = "up" if up else "down"
        if kw:
            self._do(f"set {name} {kw}", self.ipr.link, "set", index=idx, **kw)

    def no_ipv6_link_local(self, name: str) -> None:
        """Have the kernel generate no IPv6 link-local address for `name` when it
        comes up (addrgenmode none), as kernel WireGuard does for its devices."""
        idx = self.require_index(name)
        spec = {"attrs": [("AF_INET6", {"attrs": [
            ("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]}
        self._do(f"set addrgenmode none on {name}", self.ipr.link, "set", index=idx,
                 IFLA_AF_SPEC=spec)

    def delete_link(self, name: str) -> bool:
        idx = self.link_index(name)
        if idx is None:
            return False
        self._do(f"delete link {name}", self.ipr.link, "del", index=idx)
        return True

    # ---- addresses

    def addresses(self, name: str) -> list[Interface]:
        idx = self.require_index(name)
        out: list[Interface] = []
        for msg in self.ipr.get_addr(index=idx):
            addr = msg.get_attr("IFA_ADDRESS")
            out.append(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))
        return out

    def add_address(self, name: str, iface: Interface) -> None:
        idx = self.require_index(name)
        kw: dict[str, Any] = {}
        if iface.version == 6:
            kw["flags"] = 0x02  # IFA_F_NODAD: usable at once, as wg-quick's addresses are
        self._do(f"add address {iface} to {name}", self.ipr.addr, "add", index=idx,
                 address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)

    def del_address(self, name: str, iface: Interface) -> None:
        idx = self.require_index(name)
        self._do(f"delete address {iface} from {name}", self.ipr.addr, "del", index=idx,
                 address=str(iface.ip), prefixlen=iface.network.prefixlen)

    # ---- routes

    def add_route(self, dst: Network, name: str, table: int | None = None) -> None:
        idx = self.require_index(name)
        kw: dict[str, Any] = {"table": table} if table else {}
        self._do(f"add route {dst} dev {name}", self.ipr.route, "add", dst=str(dst),
                 oif=idx, family=_family(dst.version), **kw)

    def del_route(self, dst: Network, name: str, table: int | None = None) -> None:
        idx = self.require_index(name)
        kw: dict[str, Any] = {"table": table} if table else {}
        self._do(f"delete route {dst}", self.ipr.route, "del", dst=str(dst), oif=idx,
                 family=_family(dst.version), **kw)

    def routes(self, name: str, table: int | None = None) -> list[Network]:
        """Unicast routes via `name` in `table` (default: main), as networks."""
        idx = self.require_index(name)
        out: list[Network] = []
        for family in (AF_INET, AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=table or 254):
                if msg.get_attr("RTA_OIF") != idx or msg["type"] != 1:
                    continue
                if msg.get_attr("RTA_TABLE") != (table or 254):
                    continue
                dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == AF_INET else "::")
                net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}")
                if net.is_link_local or net.network_address.is_multicast:
                    continue
                out.append(net)
        return out

    def table_in_use(self, table: int) -> bool:
        return any(self.ipr.get_routes(family=f, table=table) for f in (AF_INET, AF_INET6))

    def route_mtu(self, addr: str) -> int | None:
        """MTU of the path the kernel would use to reach `addr` (route MTU, else device MTU)."""
        try:
            msg = self.ipr.route("get", dst=addr)[0]
        except (NetlinkError, IndexError):
            return None
        metrics = msg.get_attr("RTA_METRICS")
        if metrics is not None and metrics.get_attr("RTAX_MTU"):
            return int(metrics.get_attr("RTAX_MTU"))
        oif = msg.get_attr("RTA_OIF")
        if oif is None:
            return None
        return self.ipr.link("get", index=oif)[0].get_attr("IFLA_MTU")

    def route_device(self, addr: str) -> str | None:
        """Name of the interface the kernel would use to reach `addr`, if any."""
        try:
            msg = self.ipr.route("get", dst=addr)[0]
        except (NetlinkError, IndexError):
            return None
        oif = msg.get_attr("RTA_OIF")
        if oif is None:
            return None
        return self.ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")

    def default_route_mtu(self) -> int | None:
        """MTU of the device carrying the IPv4 (else IPv6) default route, if any."""
        for family in (AF_INET, AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=254):
                if msg["dst_len"] == 0 and msg.get_attr("RTA_OIF"):
                    return self.ipr.link("get", index=msg.get_attr("RTA_OIF"))[0].get_attr(
                        "IFLA_MTU")
        return None

    # ---- policy rules

    def add_rule(self, version: int, *, priority: int, table: int, fwmark: int | None = None,
                 invert: bool = False, suppress_prefixlength: int | None = None) -> None:
        kw: dict[str, Any] = {"family": _family(version), "priority": priority, "table": table}
        if fwmark is not None:
            kw["fwmark"] = fwmark
        if invert:
            kw["flags"] = FIB_RULE_INVERT
        if suppress_prefixlength is not None:
            kw["suppress_prefixlen"] = suppress_prefixlength
        self._do(f"add rule {kw}", self.ipr.rule, "add", **kw)

    def del_rule(self, version: int, *, priority: int, table: int) -> None:
        self._do(f"delete rule pref {priority}", self.ipr.rule, "del",
                 family=_family(version), priority=priority, table=table)

    def rules(self, version: int) -> list[dict[str, Any]]:
        out = []
        for msg in self.ipr.get_rules(family=_family(version)):
            out.append({
                "priority": msg.get_attr("FRA_PRIORITY") or 0,
                "table": msg.get_attr("FRA_TABLE"),
                "fwmark": msg.get_attr("FRA_FWMARK"),
                "invert": bool(msg["flags"] & FIB_RULE_INVERT),
                "suppress_prefixlength": msg.get_attr("FRA_SUPPRESS_PREFIXLEN"),
            })
        return out


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in `netns` (for /proc/sys writes and sockets)."""
    if not netns:
        yield
        return
    from pyroute2.netns import popns, pushns

    pushns(netns)
    try:
        yield
    finally:
        popns()


def write_sysctl(key: str, value: str, netns: str | None = None) -> str | None:
    """Set net sysctl `key` (dotted) in `netns`; returns the old value, None if unchanged."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(netns):
        with open(path) as f:
            old = f.read().strip()
        if old == value:
            return None
        with open(path, "w") as f:
            f.write(value)
    return old
