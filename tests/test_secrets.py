"""Secrets and privileges (issue 6, item 7), on live daemons in netlab namespaces.

* the UAPI directory the daemon creates is 0700 and the socket 0600, and the
  real `wg` still manages the interface through it;
* `wgx up/show/set/down` as an unprivileged user (uid 65534 via setpriv) exit
  non-zero with one clear line, no traceback, and change nothing;
* `wgx up` of a config that others can read warns like wg-quick, without
  printing the key; the private key appears neither in `wgx up`'s output,
  `wgx show` (text and JSON), `wgx showconf`-less outputs nor the daemon log
  at LOG_LEVEL=verbose.

The whole suite is also checked for leaked keys by tests/keyguard.py.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import keyguard
import netlab
import pytest
from test_cli_tunnel import IFACE, assert_clean, settled, wgx, wgx_ok, write_conf


@pytest.fixture(autouse=True)
def _no_state_left(lab: netlab.Lab) -> Iterator[None]:
    """A failing test leaves no /run/wgx/NETNS behind (its namespace is ours and unique)."""
    yield
    for h in lab.hosts.values():
        shutil.rmtree(f"/run/wgx/{h.name}", ignore_errors=True)


pytestmark = pytest.mark.privileged

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_fresh_uapi_dir_is_root_only_and_wg_still_works(lab: netlab.Lab) -> None:
    """In a mount namespace with an empty /run, the daemon creates /run/wireguard 0700."""
    h = lab.a
    exe = shutil.which("wgx-userspace")
    assert exe is not None
    p = h.popen(["unshare", "-m", "sh", "-c",
                 'mount -t tmpfs -o mode=0755 wgxtest /run && exec "$@"', "sh",
                 exe, "-f", "wgm0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = Path(f"/proc/{p.pid}/root/run/wireguard")
    netlab.wait_until(lambda: (root / "wgm0.sock").exists() or p.poll() is not None,
                      timeout=15, what="the daemon's socket")
    assert p.poll() is None, p.stderr.read() if p.stderr else ""
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert os.stat(root).st_uid == 0
    sock = os.stat(root / "wgm0.sock")
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    # the real wg, in the daemon's mount namespace, still works (it runs as root)
    cp = subprocess.run(["nsenter", "-t", str(p.pid), "-m", "-n", "wg", "show", "wgm0"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0 and "listening port" in cp.stdout, cp.stderr
    # another user can neither list the directory nor reach the socket
    probe = ("import os, socket\n"
             "for f in (lambda: os.listdir('/run/wireguard'),\n"
             "          lambda: socket.socket(socket.AF_UNIX).connect("
             "'/run/wireguard/wgm0.sock')):\n"
             "    try: f(); print('reached')\n"
             "    except PermissionError: print('denied')\n")
    cp = subprocess.run(["nsenter", "-t", str(p.pid), "-m", "-n", *NOBODY, sys.executable,
                         "-c", probe], capture_output=True, text=True, timeout=20)
    assert cp.stdout.split() == ["denied", "denied"], cp
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0


def _as_nobody(h: netlab.Host, *args: str) -> subprocess.CompletedProcess:
    """`wgx ARGS --netns NS` as uid/gid 65534 (the mount namespace is set up as root)."""
    netlab._ensure_run_wireguard()
    argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /run/wireguard && exec "$@"',
            str(h.uapi_dir), *NOBODY, "wgx", *args, "--netns", h.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _world_readable_copy(conf: Path) -> tuple[Path, Path]:
    """A copy of `conf` that uid 65534 can read, in a 0755 directory (same name)."""
    d = Path(tempfile.mkdtemp(prefix="wgxt-secrets-"))
    d.chmod(0o755)
    copy = d / conf.name
    copy.write_text(conf.read_text())
    copy.chmod(0o644)
    return d, copy


def _state(h: netlab.Host) -> tuple:
    """Everything a wgx command could change in h: netns, UAPI dir, state files, wg dump."""
    state_dir = Path(f"/run/wgx/{h.name}")
    files = sorted(os.listdir(state_dir)) if state_dir.exists() else []
    dump = h.wg("show", "all", "dump", check=False)
    return (netlab.snapshot(h.name), sorted(os.listdir(h.uapi_dir)), files, dump)


def test_non_root_commands_refused_and_change_nothing(lab: netlab.Lab) -> None:
    a = lab.a
    conf = write_conf(lab, a)
    d, readable = _world_readable_copy(conf)
    try:
        # nothing up yet: `up` as nobody must not create anything
        before = _state(a)
        results = {"up": _as_nobody(a, "up", str(readable))}
        assert _state(a) == before
        # a live interface (brought up by root), which show/set/down as nobody target
        wgx_ok(a, "up", str(conf))
        before = _state(a)
        results["show"] = _as_nobody(a, "show", IFACE)
        results["set"] = _as_nobody(a, "set", IFACE, "listen-port", "4242")
        results["down"] = _as_nobody(a, "down", str(readable))
        assert _state(a) == before
        for cmd, cp in results.items():
            lines = cp.stderr.strip().splitlines()
            print(f"\nnobody: wgx {cmd}: rc={cp.returncode}: {cp.stderr.strip()}")
            assert cp.returncode == 1, (cmd, cp.stdout, cp.stderr)
            assert lines == [f"error: `wgx {cmd}' must be run as root"], (cmd, cp.stderr)
            assert cp.stdout == "", (cmd, cp.stdout)
        wgx_ok(a, "down", str(conf))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_readable_config_warns_and_key_never_shown(lab: netlab.Lab) -> None:
    a = lab.a
    snaps = settled(lab)
    conf = write_conf(lab, a)
    d, readable = _world_readable_copy(conf)
    assert a.private_key_file is not None
    key = base64.b64decode(a.private_key_file.read_text().strip())
    log = a.dir / "wgx-up.log"
    try:
        env = {**os.environ, "LOG_LEVEL": "verbose", "WGX_LOG_FILE": str(log)}
        cp = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /run/wireguard && exec "$@"',
             str(a.uapi_dir), "wgx", "up", str(readable), "--netns", a.name],
            capture_output=True, text=True, timeout=60, env=env)
        assert cp.returncode == 0, cp.stderr
        assert f"warning: Warning: `{readable}' is world accessible" in cp.stderr, cp.stderr
        outputs = {"up": cp.stdout + cp.stderr}
        readable.chmod(0o640)
        outputs["show"] = wgx_ok(a, "show", IFACE)
        outputs["show --json"] = wgx_ok(a, "show", IFACE, "--json")
        outputs["show all"] = wgx_ok(a, "show")
        bad = wgx(a, "set", IFACE, "private-key", "/nonexistent/key")
        outputs["set error"] = bad.stdout + bad.stderr
        assert "(hidden)" in outputs["show"]
        cp = wgx(a, "down", str(readable))
        assert cp.returncode == 0, cp.stderr
        assert f"`{readable}' is accessible to its group" in cp.stderr, cp.stderr
        outputs["down"] = cp.stdout + cp.stderr
        outputs["daemon log"] = log.read_text()
        assert outputs["daemon log"].strip(), "the daemon logged nothing at LOG_LEVEL=verbose"
        for what, text in outputs.items():
            assert keyguard.scan(text, {key}) == [], f"private key in the output of {what}"
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert_clean(a, snaps["a"])
