"""Crash and restart (issue 6, item 5), live, in netlab namespaces.

* `wgx up --dataplane xdp` (with a default route: policy rules + sysctl), then
  SIGKILL of its daemon, then `wgx up` again: it reports and removes what the
  dead daemon left (state file, policy rules, stale socket), and afterwards
  there is exactly one XDP program on the underlay (the new one), the old
  program and its maps are gone from the kernel (checked by id through bpf(2)),
  one TUN, no duplicate routes or rules; `wgx down` after a second SIGKILL
  cleans up too, and the namespace is as before.
* wireguard-go peer killed and restarted with the same private key, twice:
  each time it handshakes again with wgx (XDP fast path) and traffic flows;
  a captured data packet of the first session is dropped when replayed: first
  by the replay window (the old keypair survives one rotation as `previous`,
  as in the kernel), after the second restart as an unknown index in XDP.

SIGKILL of one worker (recovery < 1 s, measured) is in test_fastpath.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from test_cli_tunnel import IFACE, assert_clean, settled
from test_fastpath import (
    WGGO,
    WGGO_ENV,
    WGX,
    XDP_ENV,
    alive,
    ints,
    settled_stats,
    wgx_get,
    worker_pids,
    xdp_prog_ids,
)

from wgx.dataplane import xdp


@pytest.fixture(autouse=True)
def _no_state_left(lab: netlab.Lab) -> Iterator[None]:
    """A failing test leaves no /run/wgx/NETNS behind (its namespace is ours and unique)."""
    yield
    for h in lab.hosts.values():
        shutil.rmtree(f"/run/wgx/{h.name}", ignore_errors=True)


pytestmark = [pytest.mark.privileged, pytest.mark.slow]

OV4, OV6 = netlab.Lab.OVERLAY4, netlab.Lab.OVERLAY6
UL4, PORTS = netlab.Lab.UNDERLAY4, netlab.Lab.PORTS
_BPF_MAP_GET_FD_BY_ID = 14


# ------------------------------------------------------------------ helpers


def prog_map_ids(prog_id: int) -> list[int]:
    """The ids of the maps a loaded BPF program uses (struct bpf_prog_info.map_ids)."""
    fd = xdp.prog_fd_by_id(prog_id)
    try:
        ids = (ctypes.c_uint32 * 16)()
        info = ctypes.create_string_buffer(80)
        struct.pack_into("=IQ", info, 52, 16, ctypes.addressof(ids))
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
        xdp._bpf(xdp._BPF_OBJ_GET_INFO_BY_FD, attr)
        n = struct.unpack_from("=I", info, 52)[0]
        return list(ids[:min(n, 16)])
    finally:
        os.close(fd)


def bpf_exists(kind: str, obj_id: int) -> bool:
    """Is the BPF program/map with this id still loaded?"""
    try:
        if kind == "prog":
            fd = xdp.prog_fd_by_id(obj_id)
        else:
            attr = ctypes.create_string_buffer(12)
            struct.pack_into("=III", attr, 0, obj_id, 0, 0)
            fd = xdp._bpf(_BPF_MAP_GET_FD_BY_ID, attr)
    except OSError:
        return False
    os.close(fd)
    return True


def run_wgx(h: netlab.Host, *args: str) -> subprocess.CompletedProcess:
    netlab._ensure_run_wireguard()
    env = {**os.environ, "WGX_WORKERS": "2"}
    argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /run/wireguard && exec "$@"',
            str(h.uapi_dir), "wgx", *args, "--netns", h.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env)


def routes_by_prefix(snap: dict) -> list:
    """Routes without the interface index and link-local ones (a new TUN gets new ones)."""
    return sorted(r[:4] + r[5:] for r in snap["routes"] if not str(r[2]).startswith("fe80:"))


def start_wggo_b(lab: netlab.Lab, *, endpoint: bool) -> None:
    """wireguard-go on b with b's key, a as its peer (with a's endpoint if asked)."""
    a, b = lab.a, lab.b
    b.start_daemon(WGGO, IFACE, env=WGGO_ENV)
    args = ["set", IFACE, "private-key", str(b.private_key_file), "listen-port",
            str(PORTS["b"]), "peer", a.public_key]
    if endpoint:
        args += ["endpoint", f"{UL4['a']}:{PORTS['a']}"]
    b.wg(*args, "allowed-ips", f"{OV4['a']}/32,{OV6['a']}/128")
    b.addr_add(IFACE, f"{OV4['b']}/24")
    b.addr_add(IFACE, f"{OV6['b']}/64")
    b.link_up(IFACE, mtu=1420)


# ------------------------------------------- 1. SIGKILL of the daemon of `wgx up`


def test_wgx_up_after_daemon_sigkill_cleans_and_recovers(lab: netlab.Lab) -> None:
    a, b = lab.a, lab.b
    snaps = settled(lab)
    start_wggo_b(lab, endpoint=False)
    conf = a.dir / f"{IFACE}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("[Interface]\n"
                f"PrivateKey = {a.private_key_file.read_text().strip()}\n"  # type: ignore[union-attr]
                f"Address = {OV4['a']}/24, {OV6['a']}/64\n"
                f"ListenPort = {PORTS['a']}\n"
                "\n[Peer]\n"
                f"PublicKey = {b.public_key}\n"
                f"Endpoint = {UL4['b']}:{PORTS['b']}\n"
                "AllowedIPs = 0.0.0.0/0, fd99::2/128\n")  # a default route: rules + sysctl
    state_file = Path(f"/run/wgx/{a.name}/{IFACE}.json")

    cp = run_wgx(a, "up", str(conf), "--dataplane", "xdp")
    assert cp.returncode == 0, cp.stderr
    lab.ping(a, OV4["b"], count=3, attempts=5)
    st = wgx_get(a, IFACE)
    assert st["dataplane"] == "xdp", st
    daemon = json.loads(state_file.read_text())["daemon_pid"]
    assert daemon == int(st["pid"])
    workers = worker_pids(st)
    old_prog, = xdp_prog_ids(a)
    old_maps = prog_map_ids(old_prog)
    assert len(old_maps) >= 4, old_maps
    up1 = netlab.snapshot(a.name)
    assert len(up1["rules"][4]) > len(snaps["a"]["rules"][4])  # the fwmark/suppress rules

    t_kill = time.monotonic()
    os.kill(daemon, signal.SIGKILL)
    netlab.wait_until(lambda: not alive(daemon) and not any(alive(p) for p in workers),
                      timeout=3, what="daemon and workers to die")
    netlab.wait_until(lambda: not a.link_exists(IFACE), timeout=3, what="the TUN to go")
    # What a SIGKILL leaves: the state file, the rules, the socket file, the program.
    assert state_file.exists() and a.socket_path(IFACE).exists()
    assert netlab.snapshot(a.name)["rules"] == up1["rules"]
    assert xdp_prog_ids(a) in ([], [old_prog])

    t_up = time.monotonic()
    cp = run_wgx(a, "up", str(conf), "--dataplane", "xdp")
    up_s = time.monotonic() - t_up
    assert cp.returncode == 0, cp.stderr
    assert f"daemon pid {daemon} of an earlier `up` is gone" in cp.stderr, cp.stderr
    lab.ping(a, OV4["b"], count=1, attempts=20, wait=0.5)
    recovered_s = time.monotonic() - t_kill
    new_prog, = xdp_prog_ids(a)
    assert new_prog != old_prog
    netlab.wait_until(lambda: not bpf_exists("prog", old_prog)
                      and not any(bpf_exists("map", m) for m in old_maps),
                      timeout=3, what="the old program and its maps to be freed")
    assert set(prog_map_ids(new_prog)).isdisjoint(old_maps)
    up2 = netlab.snapshot(a.name)
    assert up2["rules"] == up1["rules"], "rules duplicated or missing after the second up"
    assert up2["links"] == up1["links"] and up2["links"].count(IFACE) == 1
    assert routes_by_prefix(up2) == routes_by_prefix(up1)
    assert wgx_get(a, IFACE)["dataplane"] == "xdp"
    lab.ping(a, OV4["b"], count=3)
    print(f"\nwgx up after SIGKILL: {up_s:.2f}s (incl. XDP compile); first reply "
          f"{recovered_s:.2f}s after the kill; old prog {old_prog} maps {old_maps} freed; "
          f"new prog {new_prog}")

    # SIGKILL again, then `wgx down`: it cleans up after the dead daemon, quickly.
    daemon = json.loads(state_file.read_text())["daemon_pid"]
    os.kill(daemon, signal.SIGKILL)
    netlab.wait_until(lambda: not a.link_exists(IFACE), timeout=3, what="the TUN to go")
    t_down = time.monotonic()
    cp = run_wgx(a, "down", str(conf))
    assert cp.returncode == 0, cp.stderr
    assert time.monotonic() - t_down < 4.0
    assert not state_file.exists() and not a.socket_path(IFACE).exists()
    b.stop_daemon()
    # The program of the killed daemon stays on ul0 until a daemon replaces it:
    # remove it as a next `wgx up` would, then the namespace is as before.
    xdp.cleanup_stale(netlab.UNDERLAY_IF, a.name)
    assert_clean(a, snaps["a"])


# ------------------------------------------- 2. peer restart with the same key

_CAPTURE = r"""
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("ul0", 0))
s.settimeout(15)
print("ready", flush=True)
while True:
    frame, addr = s.recvfrom(65535)
    if addr[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
        continue
    ihl = (frame[14] & 15) * 4
    if frame[23] != 17:
        continue
    udp = frame[14 + ihl:]
    if struct.unpack("!H", udp[2:4])[0] == int(sys.argv[1]) and udp[8] == 4 \
            and len(udp) > 8 + 32:
        print(udp[8:].hex(), flush=True)
        break
"""

_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def tun_rx_packets(h: netlab.Host, iface: str = "wg0") -> int:
    return int(h.run(["cat", f"/sys/class/net/{iface}/statistics/rx_packets"]).stdout)


def test_peer_restart_with_same_key_rehandshakes_and_old_session_dropped(
        lab: netlab.Lab) -> None:
    tun = lab.tunnel(WGX, WGGO, env_a=XDP_ENV, env_b=WGGO_ENV, establish=True)
    a, b = lab.a, lab.b
    assert wgx_get(a)["dataplane"] == "xdp"
    cap = b.popen([sys.executable, "-c", _CAPTURE, str(PORTS["a"])], stdout=subprocess.PIPE,
                  text=True)
    assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
    lab.ping(b, tun.overlay4(a), count=1, attempts=3)
    old_packet = cap.communicate(timeout=20)[0].strip()
    assert len(old_packet) > 2 * 32, "no transport packet of the first session captured"

    def replay() -> tuple[dict[str, int], dict[str, int], int]:
        before, rx0 = settled_stats(a), tun_rx_packets(a)
        b.run([sys.executable, "-c", _SEND, UL4["a"], str(PORTS["a"]), old_packet])
        after = settled_stats(a)
        return before, after, tun_rx_packets(a) - rx0

    timings = []
    for restart in range(2):
        hs_before = lab.peer_stats(a)["latest_handshake"]
        time.sleep(1.05)  # latest handshake has 1 s resolution
        b.daemon.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        b.daemon.wait(timeout=5)  # type: ignore[union-attr]
        b.daemon = None
        netlab.wait_until(lambda: not b.link_exists("wg0"), timeout=3,
                          what="b's TUN to go")
        t0 = time.monotonic()
        b.start_daemon(WGGO, "wg0", env=WGGO_ENV)
        b.wg("set", "wg0", "private-key", str(b.private_key_file), "listen-port",
             str(PORTS["b"]), "peer", a.public_key, "endpoint", f"{UL4['a']}:{PORTS['a']}",
             "allowed-ips", f"{OV4['a']}/32,{OV6['a']}/128")
        b.addr_add("wg0", f"{OV4['b']}/24")
        b.addr_add("wg0", f"{OV6['b']}/64")
        b.link_up("wg0", mtu=1420)
        lab.ping(b, tun.overlay4(a), count=1, attempts=20, wait=0.5)
        timings.append(time.monotonic() - t0)
        assert lab.peer_stats(a)["latest_handshake"] > hs_before
        lab.ping(a, tun.overlay4(b), count=3)
        before, after, delivered = replay()
        assert delivered == 0, "a replayed packet of the old session reached the TUN"
        if restart == 0:
            # The old keypair is `previous` now: the replay window drops the copy.
            dropped = sum(after[k] - before[k] for k in after
                          if k.endswith("drop_replay") or k == "xdp.drop_stale_counter"
                          or k == "drop.replay")
            assert dropped == 1, {k: after[k] - before[k] for k in after
                                  if after[k] != before.get(k)}
        else:
            # After a second rotation the old index is unknown: XDP drops it.
            assert after["xdp.drop_unknown_index"] - before["xdp.drop_unknown_index"] == 1, \
                {k: after[k] - before[k] for k in after if after[k] != before.get(k)}
    print(f"\npeer restarted twice with the same key: traffic again after "
          f"{', '.join(f'{t:.2f}s' for t in timings)} (restart + wg set + handshake)")
    assert ints(wgx_get(a))["worker_restarts"] == 0
