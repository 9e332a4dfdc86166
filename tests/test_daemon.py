"""Lifecycle of the wgx-userspace daemon in a network namespace.

It must behave like `wireguard-go IFACE`: socket and directory modes, exit on
SIGTERM/SIGINT, on deletion of its TUN device and on removal of its UAPI
socket, and daemonize unless -f is given.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time

import netlab
import pytest

from wgx.control.device import TUN_TXQUEUELEN

pytestmark = pytest.mark.privileged

WGX = [shutil.which("wgx-userspace") or "wgx-userspace"]


def wait_exit(p, timeout: float = 5.0) -> int:
    return p.wait(timeout=timeout)


def test_socket_modes_and_sigterm(lab: netlab.Lab) -> None:
    h = lab.a
    p = h.start_daemon(WGX, "wgx0")
    sock = h.socket_path("wgx0")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(h.uapi_dir).st_mode) == 0o700  # root-only (issue 6)
    assert "listening port" in h.wg("show", "wgx0")
    p.send_signal(signal.SIGTERM)
    assert wait_exit(p) == 0
    assert not sock.exists()
    assert not h.link_exists("wgx0")


def test_sigint_exits_cleanly(lab: netlab.Lab) -> None:
    h = lab.a
    p = h.start_daemon(WGX, "wgx0")
    p.send_signal(signal.SIGINT)
    assert wait_exit(p) == 0
    assert not h.socket_path("wgx0").exists()


def test_exits_when_tun_deleted(lab: netlab.Lab) -> None:
    h = lab.a
    p = h.start_daemon(WGX, "wgx0")
    h.ip("link", "del", "wgx0")
    assert wait_exit(p) == 0
    assert not h.socket_path("wgx0").exists()


def test_exits_when_socket_removed(lab: netlab.Lab) -> None:
    h = lab.a
    p = h.start_daemon(WGX, "wgx0")
    h.socket_path("wgx0").unlink()
    assert wait_exit(p) == 0
    assert not h.link_exists("wgx0")


def test_second_daemon_on_same_interface_refused(lab: netlab.Lab) -> None:
    h = lab.a
    h.start_daemon(WGX, "wgx0")
    cp = netlab._run(h.uapi_wrap(WGX + ["-f", "wgx0"]), check=False)
    assert cp.returncode != 0
    assert "wgx0" in cp.stderr
    assert "listening port" in h.wg("show", "wgx0")  # the first one is undisturbed


def test_daemonizes_without_foreground_flag(lab: netlab.Lab) -> None:
    h = lab.a
    t0 = time.monotonic()
    cp = netlab._run(h.uapi_wrap(WGX + ["wgx1"]), timeout=20)
    assert cp.returncode == 0
    assert time.monotonic() - t0 < 15
    sock = h.socket_path("wgx1")
    assert sock.exists() and h.link_exists("wgx1")
    assert "listening port" in h.wg("show", "wgx1")
    sock.unlink()  # the detached daemon notices and exits, removing its TUN
    assert netlab.wait_until(lambda: not h.link_exists("wgx1"), timeout=5)


def test_bad_interface_name_is_an_error(lab: netlab.Lab) -> None:
    cp = netlab._run(lab.a.uapi_wrap(WGX + ["-f", "x" * 20]), check=False)
    assert cp.returncode == 1
    assert "invalid interface name" in cp.stderr


def test_log_level_and_version() -> None:
    import subprocess

    cp = subprocess.run(WGX + ["--version"], capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0 and cp.stdout.startswith("wgx-userspace v")
    cp = subprocess.run(WGX + ["-f", "wgxbad0"], capture_output=True, text=True, timeout=20,
                        env={**os.environ, "LOG_LEVEL": "loud"})
    assert cp.returncode == 2 and "LOG_LEVEL" in cp.stderr


def test_fresh_tun_defaults(lab: netlab.Lab) -> None:
    """A TUN the daemon creates gets MTU 1420 (as wireguard-go), a 2048-packet
    transmit queue (the tun driver's 500 overflows while a worker waits for a CPU)
    and, like kernel WireGuard's devices, no IPv6 link-local address once up."""
    import json

    h = lab.a
    p = h.start_daemon(WGX, "wgx0")
    link = json.loads(h.ip("-d", "-j", "link", "show", "wgx0"))[0]
    assert (link["mtu"], link["txqlen"]) == (1420, TUN_TXQUEUELEN) == (1420, 2048)
    assert link["inet6_addr_gen_mode"] == "none"
    h.ip("link", "set", "wgx0", "up")
    addrs = json.loads(h.ip("-6", "-j", "addr", "show", "dev", "wgx0"))
    assert [a for i in addrs for a in i.get("addr_info", [])] == []
    p.send_signal(signal.SIGTERM)
    assert wait_exit(p) == 0


_REFUSED_ADDRGENMODE = """
import json, subprocess, sys
from wgx.control import device, netconf

def refuse(self, name):
    raise netconf.NetConfError(f"set addrgenmode none on {name}: Operation not permitted")

netconf.NetConf.no_ipv6_link_local = refuse
d = device.Device.open("wgx0", device.DeviceOptions(dataplane="socket", uapi_dir=sys.argv[1]))
link = json.loads(subprocess.run(["ip", "-d", "-j", "link", "show", "wgx0"],
                                 capture_output=True, text=True, check=True).stdout)[0]
d.close()
print(link["inet6_addr_gen_mode"])
"""


def test_tun_opens_when_addrgenmode_is_refused(lab: netlab.Lab, tmp_path) -> None:
    """The link-local suppression is best effort: a namespace that refuses it (a
    read-only setup, no IPv6) still gets its interface, with the kernel's mode."""
    import sys

    cp = lab.a.run([sys.executable, "-c", _REFUSED_ADDRGENMODE, str(tmp_path)])
    assert cp.stdout.strip() not in ("", "none")
    assert not lab.a.link_exists("wgx0")
