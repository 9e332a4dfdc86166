"""A netlab.Lab whose two hosts talk through a switch that an attacker is plugged into.

    a (ul0) ---- pa [ sw: br0 ] pb ---- (ul0) b
                      px
                      |
                    (ul0) x   attacker

``sw`` is a namespace holding a Linux bridge (a learning switch, so the
attacker's injected frames and floods are switched to their destination only).
The switch has a SPAN port: tc ``mirred`` copies every frame entering from a
and from b to px, so the attacker sees both directions of the tunnel on its
ul0 with an AF_PACKET socket, as a tap on the wire would, while a and b never
see the attacker's frames unless they are addressed to them.

Addresses: a 198.18.0.1, b 198.18.0.2, x 198.18.0.3 (/24).  Spoofed flood
sources live in 198.19.0.0/16: a routes that prefix via x, so a's cookie
replies to them go to x (one neighbour entry, no ARP storm) where an nft
counter witnesses them.  All four namespaces are created and removed here.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import netlab

SPOOF_NET = "198.19.0.0/16"
X_ADDR = "198.18.0.3"
QUEUES = netlab.UNDERLAY_QUEUES

_NFT_X = """
table inet wgxatk {
    counter cookie_replies {}
    counter to_spoofed {}
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        ip daddr %(net)s counter name "to_spoofed"
        ip daddr %(net)s udp sport %(port)d @th,64,8 3 counter name "cookie_replies"
    }
}
"""


class SwitchedLab(netlab.Lab):
    """netlab.Lab with a switch namespace between a and b and an attacker x on it."""

    def __init__(self, span: bool = True) -> None:
        super().__init__()
        self.span = span
        self.extra: dict[str, netlab.Host] = {}

    @property
    def sw(self) -> netlab.Host:
        return self.extra["sw"]

    @property
    def x(self) -> netlab.Host:
        return self.extra["x"]

    def start(self) -> None:
        netlab._live_labs.add(self)
        try:
            netlab._acquire_run_wireguard()
            self._runwg = True
            self.dir = Path(tempfile.mkdtemp(prefix=f"{netlab.NS_PREFIX}-lab-"))
            for label in ("a", "b"):
                h = netlab.Host(label, self.dir)
                self.hosts[label] = h
                h.create()
            for label in ("sw", "x"):
                h = netlab.Host(label, self.dir)
                self.extra[label] = h
                h.create()
            sw = self.sw
            sw.ip("link", "add", "br0", "type", "bridge")
            q = ["numtxqueues", str(QUEUES), "numrxqueues", str(QUEUES)]
            for label, port in (("a", "pa"), ("b", "pb"), ("x", "px")):
                h = self.hosts.get(label) or self.extra[label]
                netlab._run(["ip", "-n", sw.name, "link", "add", port, *q, "type", "veth",
                             "peer", "name", netlab.UNDERLAY_IF, *q, "netns", h.name])
                for end, dev in ((sw, port), (h, netlab.UNDERLAY_IF)):
                    end.run(["ethtool", "-L", dev, "rx", str(QUEUES), "tx", str(QUEUES)])
                sw.ip("link", "set", port, "master", "br0")
                sw.link_up(port, mtu=1500)
            sw.link_up("br0")
            for label in ("a", "b"):
                h = self.hosts[label]
                h.addr_add(netlab.UNDERLAY_IF, f"{self.UNDERLAY4[label]}/{self.V4_PREFIX}")
                h.addr_add(netlab.UNDERLAY_IF, f"{self.UNDERLAY6[label]}/{self.V6_PREFIX}")
                h.underlay = {"v4": self.UNDERLAY4[label], "v6": self.UNDERLAY6[label]}
                h.link_up(netlab.UNDERLAY_IF, mtu=1500)
                self._genkey(h)
            self.x.addr_add(netlab.UNDERLAY_IF, f"{X_ADDR}/24")
            self.x.link_up(netlab.UNDERLAY_IF, mtu=1500)
            self.x.underlay = {"v4": X_ADDR}
            self.a.ip("route", "add", SPOOF_NET, "via", X_ADDR)
            if self.span:
                for port in ("pa", "pb"):
                    sw.run(["tc", "qdisc", "add", "dev", port, "clsact"])
                    sw.run(["tc", "filter", "add", "dev", port, "ingress", "protocol", "all",
                            "u32", "match", "u32", "0", "0",
                            "action", "mirred", "egress", "mirror", "dev", "px"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        errors = []
        for h in self.extra.values():
            try:
                h.close()
            except Exception as e:
                errors.append(str(e))
        self.extra.clear()
        try:
            super().close()
        finally:
            if errors:
                raise netlab.NetlabError("; ".join(errors))

    # -- attacker helpers
    def mac_of(self, h: netlab.Host, dev: str = netlab.UNDERLAY_IF) -> str:
        return h.run(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()

    def watch_cookie_replies(self, port: int) -> None:
        """nft counters in x: frames a sends to spoofed sources, and the cookie replies."""
        self.x.run(["nft", "-f", "-"], input=_NFT_X % {"net": SPOOF_NET, "port": port})

    def x_counters(self) -> dict[str, int]:
        data = json.loads(self.x.run(["nft", "-j", "list", "counters", "table", "inet",
                                      "wgxatk"]).stdout)
        return {c["counter"]["name"]: c["counter"]["packets"]
                for c in data["nftables"] if "counter" in c}


def link_counter(h: netlab.Host, dev: str, name: str) -> int:
    with contextlib.suppress(netlab.NetlabError):
        return int(h.run(["cat", f"/sys/class/net/{dev}/statistics/{name}"]).stdout)
    return -1
