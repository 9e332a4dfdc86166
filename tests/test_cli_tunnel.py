"""Live tunnels brought up from config files with `wgx up`, between two namespaces.

* wgx <-> wgx, both from `wgx up`;
* wgx (`wgx up`) <-> wireguard-go brought up by the real `wg-quick up`;
* `wgx exporter` scraped from a live tunnel before and after traffic, its whole
  page parsed with prometheus_client.

Each `wgx` runs from the root netns with `--netns` and the host's private
/run/wireguard (a bind mount in its own mount namespace); `wg-quick` runs inside
the namespace with the same private directory. After `down` nothing may be left:
the namespace is compared with a pyroute2 snapshot taken before `up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest

from wgx.control.netconf import NetConf

pytestmark = pytest.mark.privileged

_UAPI_SH = 'mount --bind "$0" /run/wireguard && exec "$@"'
IFACE = "wgtun0"
OV4, OV6 = netlab.Lab.OVERLAY4, netlab.Lab.OVERLAY6
UL4, PORTS = netlab.Lab.UNDERLAY4, netlab.Lab.PORTS


@pytest.fixture(autouse=True)
def _no_state_dirs(lab: netlab.Lab) -> Iterator[None]:
    """wgx leaves an empty /run/wgx/NETNS after `down` (a bug, see test_cli_corpus.py);
    remove ours so runs leave nothing behind."""
    yield
    for h in lab.hosts.values():
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/wgx/{h.name}")


# ------------------------------------------------------------------------- helpers


def wgx(h: netlab.Host, *args: str) -> subprocess.CompletedProcess:
    """`wgx ARGS --netns NS` from the root netns with h's private UAPI directory."""
    netlab._ensure_run_wireguard()
    argv = ["unshare", "-m", "sh", "-c", _UAPI_SH, str(h.uapi_dir), "wgx", *args,
            "--netns", h.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def wgx_ok(h: netlab.Host, *args: str) -> str:
    cp = wgx(h, *args)
    assert cp.returncode == 0, f"wgx {' '.join(args)} on {h}: rc={cp.returncode}\n{cp.stderr}"
    return cp.stdout


def write_conf(lab: netlab.Lab, h: netlab.Host, name: str = IFACE) -> Path:
    """h's side of the tunnel: overlay .1/::1 or .2/::2, the other host as peer."""
    other = lab.peer(h)
    assert h.private_key_file is not None
    conf = h.dir / f"{name}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            "[Interface]\n"
            f"PrivateKey = {h.private_key_file.read_text().strip()}\n"
            f"Address = {OV4[h.label]}/24, {OV6[h.label]}/64\n"
            f"ListenPort = {PORTS[h.label]}\n"
            "\n[Peer]\n"
            f"PublicKey = {other.public_key}\n"
            f"Endpoint = {UL4[other.label]}:{PORTS[other.label]}\n"
            f"AllowedIPs = {OV4[other.label]}/32, {OV6[other.label]}/128\n")
    return conf


def settled(lab: netlab.Lab) -> dict[str, dict[str, Any]]:
    """Snapshots of both hosts once no IPv6 address is tentative any more."""
    def dad_done() -> bool:
        for h in lab.hosts.values():
            with NetConf(h.name) as nc:
                if any((m.get_attr("IFA_FLAGS") or m["flags"]) & 0x40
                       for m in nc.ipr.get_addr(family=10)):
                    return False
        return True

    netlab.wait_until(dad_done, timeout=10, what="IPv6 DAD on the underlay")
    return {label: netlab.snapshot(h.name) for label, h in lab.hosts.items()}


def leftovers(h: netlab.Host, before: dict[str, Any], iface: str = IFACE) -> list[str]:
    found = []
    now = netlab.snapshot(h.name)
    found += [f"{k} changed: {before[k]} -> {now[k]}" for k in before if now[k] != before[k]]
    if entries := sorted(os.listdir(h.uapi_dir)):
        found.append(f"files in the private UAPI dir: {entries}")
    if Path(f"/run/wgx/{h.name}/{iface}.json").exists():
        found.append("state file left")
    assert h.inode is not None
    for pid in netlab._pids_in_netns(h.inode):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(f"process {pid}: {argv}")
    return found


def assert_clean(h: netlab.Host, before: dict[str, Any]) -> None:
    """Nothing of the tunnel left in h's namespace (a daemon may take a moment to exit)."""
    try:
        netlab.wait_until(lambda: not leftovers(h, before), timeout=5, what="cleanup")
    except netlab.NetlabError:
        pytest.fail(f"left behind in {h}: {leftovers(h, before)}")


def ping_both_ways(lab: netlab.Lab) -> None:
    # The first packet waits for the handshake; later ones must all get through.
    lab.ping(lab.a, OV4["b"], count=1, attempts=5)
    for src, dst in (("a", "b"), ("b", "a")):
        lab.ping(src, OV4[dst], count=5)
        lab.ping(src, OV6[dst], count=5)


def check_handshake(h: netlab.Host, peer: netlab.Host) -> dict[str, Any]:
    shown = json.loads(wgx_ok(h, "show", IFACE, "--json"))
    assert shown["interface"] == IFACE and shown["public_key"] == h.public_key
    assert shown["listen_port"] == PORTS[h.label]
    assert shown["private_key"] == "(hidden)"
    (p,) = shown["peers"]
    assert p["public_key"] == peer.public_key
    assert sorted(p["allowed_ips"]) == sorted([f"{OV4[peer.label]}/32", f"{OV6[peer.label]}/128"])
    assert p["latest_handshake"], f"{h}: no handshake reported: {p}"
    assert time.time() - 60 <= p["latest_handshake"] <= time.time() + 1, p
    assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0, p
    return shown


# --------------------------------------------------------------------------- tests


def test_wgx_to_wgx_from_config_files(lab: netlab.Lab) -> None:
    before = settled(lab)
    confs = {label: write_conf(lab, h) for label, h in lab.hosts.items()}
    try:
        for label, h in lab.hosts.items():
            wgx_ok(h, "up", str(confs[label]))
        with NetConf(lab.a.name) as nc:
            info = nc.link_info(IFACE)
            assert info["up"] and info["mtu"] == 1420  # ul0 is 1500, minus 80
            assert {str(a) for a in nc.addresses(IFACE)} >= {"10.99.0.1/24", "fd99::1/64"}
        ping_both_ways(lab)
        for h in lab.hosts.values():
            shown = check_handshake(h, lab.peer(h))
            assert shown["dataplane"] != "unknown (not a wgx daemon)"
    finally:
        downs = {label: wgx(h, "down", str(confs[label])) for label, h in lab.hosts.items()}
    for label, cp in downs.items():
        assert cp.returncode == 0, f"wgx down on {label}: {cp.stderr}"
    for label, h in lab.hosts.items():
        assert_clean(h, before[label])


def test_wgx_to_wireguard_go_via_wg_quick(lab: netlab.Lab) -> None:
    """b: the real wg-quick, which falls back to wireguard-go (no kernel module here)
    and daemonizes it; a: `wgx up`."""
    for tool in ("wg-quick", "wireguard-go"):
        if not any(Path(d, tool).exists() for d in os.environ["PATH"].split(os.pathsep)):
            pytest.skip(f"{tool} not installed")
    before = settled(lab)
    a, b = lab.a, lab.b
    conf_a, conf_b = write_conf(lab, a), write_conf(lab, b)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL", "WG_ENDPOINT_RESOLUTION_RETRIES")}
    env["WG_QUICK_USERSPACE_IMPLEMENTATION"] = "wireguard-go"

    def wg_quick(*args: str) -> subprocess.CompletedProcess:
        # wireguard-go daemonizes (without WG_PROCESS_FOREGROUND) and, with no
        # LOG_LEVEL, detaches from our pipes, so this returns once it is up.
        return subprocess.run(b.uapi_wrap(["wg-quick", *args]), env=env, capture_output=True,
                              text=True, timeout=60)

    try:
        cp = wg_quick("up", str(conf_b))
        assert cp.returncode == 0, cp.stderr
        assert "wireguard-go" in cp.stderr  # it did fall back to the userspace daemon
        assert b.socket_path(IFACE).exists()
        wgx_ok(a, "up", str(conf_a))
        ping_both_ways(lab)
        check_handshake(a, b)
        dump = lab.wg_show_dump(b, IFACE)  # wireguard-go's side, through the real wg
        peer = dump["peers"][a.public_key]
        assert peer["latest_handshake"] > time.time() - 60
        assert peer["endpoint"] == (UL4["a"], PORTS["a"])
        assert not any(wgx_stats(b))  # b is not a wgx daemon
    finally:
        down_b = wg_quick("down", str(conf_b))
        down_a = wgx(a, "down", str(conf_a))
    assert down_b.returncode == 0, down_b.stderr
    assert down_a.returncode == 0, down_a.stderr
    assert_clean(a, before["a"])
    assert_clean(b, before["b"])


def wgx_stats(h: netlab.Host) -> list[str]:
    """`wgx show --json` drop/stat counters of h's interface (empty for other daemons)."""
    shown = json.loads(wgx_ok(h, "show", IFACE, "--json"))
    return list(shown["drops"]) + list(shown["stats"])


_FETCH = """
import sys, time, urllib.request
for _ in range(100):
    try:
        sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("no answer from " + sys.argv[1])
"""


def scrape(h: netlab.Host, url: str) -> str:
    return h.run([sys.executable, "-c", _FETCH, url], timeout=30).stdout


def peer_samples(text: str, iface: str, key: str) -> dict[str, float]:
    """Parse the whole page; return the three per-peer values for (iface, key)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in families, f"family {fam.name} appears twice"
        families[fam.name] = fam
    # prometheus_client names counter families without `_total' (OpenMetrics style)
    peer_fams = {"wireguard_peer_receive_bytes": "counter",
                 "wireguard_peer_transmit_bytes": "counter",
                 "wireguard_peer_last_handshake_seconds": "gauge"}
    for name, kind in {**peer_fams, "wireguard_device_info": "gauge"}.items():
        assert name in families, f"{name} missing; families: {sorted(families)}"
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].documentation, f"{name} has no HELP"
    (info,) = families["wireguard_device_info"].samples
    assert info.labels == {"interface": iface, "listen_port": str(PORTS["a"])}
    assert info.value == 1
    out = {}
    for name in peer_fams:
        (sample,) = families[name].samples  # one interface, one peer
        assert sample.name == (f"{name}_total" if peer_fams[name] == "counter" else name)
        assert sample.labels == {"interface": iface, "public_key": key}, sample
        assert sample.value >= 0
        out[name] = sample.value
    for name, fam in families.items():
        if name.startswith("wgx_"):  # wgx's own counters, by reason/event
            assert fam.type == "counter", name
            for s in fam.samples:
                assert set(s.labels) in ({"interface", "reason"}, {"interface", "event"}), s
                assert s.labels["interface"] == iface and s.value >= 0
    return out


def test_exporter_on_a_live_tunnel(lab: netlab.Lab) -> None:
    before = settled(lab)
    a, b = lab.a, lab.b
    confs = {label: write_conf(lab, h) for label, h in lab.hosts.items()}
    url = "http://127.0.0.1:9586/metrics"
    exp = None
    try:
        for label, h in lab.hosts.items():
            wgx_ok(h, "up", str(confs[label]))
        exp = a.popen(["unshare", "-m", "sh", "-c", _UAPI_SH, str(a.uapi_dir), "wgx",
                       "exporter", "--listen", "127.0.0.1:9586"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = peer_samples(scrape(a, url), IFACE, b.public_key)

        count, size = 20, 1000
        lab.ping(a, OV4["b"], count=1, attempts=5)  # handshake
        lab.ping(a, OV4["b"], count=count, size=size, interval=0.01)
        nbytes = 256 << 10
        sent, received = lab.tcp_transfer_sha256(a, b, OV4["b"], nbytes)
        assert sent == received
        ip_packet = size + 8 + 20  # ICMP + IPv4 headers around the payload

        def grown() -> dict[str, float] | None:
            now = peer_samples(scrape(a, url), IFACE, b.public_key)
            rx = now["wireguard_peer_receive_bytes"] - first["wireguard_peer_receive_bytes"]
            tx = now["wireguard_peer_transmit_bytes"] - first["wireguard_peer_transmit_bytes"]
            return now if rx >= count * ip_packet and tx >= count * ip_packet + nbytes else None

        try:
            second = netlab.wait_until(grown, timeout=5, what="counters to grow")
        except netlab.NetlabError:
            pytest.fail(f"counters did not grow by the traffic: before {first}, "
                        f"now {peer_samples(scrape(a, url), IFACE, b.public_key)}")
        hs = second["wireguard_peer_last_handshake_seconds"]
        assert time.time() - 60 <= hs <= time.time() + 1, hs
        # the same numbers as `wgx show` (the page was scraped first; counters only grow)
        (p,) = json.loads(wgx_ok(a, "show", IFACE, "--json"))["peers"]
        assert p["rx_bytes"] >= second["wireguard_peer_receive_bytes"]
        assert p["tx_bytes"] >= second["wireguard_peer_transmit_bytes"]
    finally:
        if exp is not None:
            netlab._terminate(exp)
        downs = [wgx(h, "down", str(confs[label])) for label, h in lab.hosts.items()]
    assert all(cp.returncode == 0 for cp in downs), [cp.stderr for cp in downs]
    assert_clean(a, before["a"])
    assert_clean(b, before["b"])
