"""The `wgx` CLI and the Interface API in fresh network namespaces.

State is checked with pyroute2 queries (wgx.control.netconf), not by parsing
`ip` output. Each command runs with a private /run/wireguard (a bind mount in
its own mount namespace) and `--netns`, so nothing touches the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import netlab
import pytest

from wgx.control.netconf import NetConf

pytestmark = pytest.mark.privileged

_UAPI_SH = 'mount --bind "$0" /run/wireguard && exec "$@"'


def wgx(h: netlab.Host, *args: str, check: bool = False, netns: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `wgx ARGS --netns NS` from the root netns with h's private UAPI directory."""
    netlab._ensure_run_wireguard()
    argv = ["unshare", "-m", "sh", "-c", _UAPI_SH, str(h.uapi_dir), "wgx", *args]
    if netns:
        argv += ["--netns", h.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def keypair(h: netlab.Host) -> tuple[str, str]:
    priv = subprocess.run(["wgx", "genkey"], capture_output=True, text=True,
                          check=True).stdout.strip()
    pub = subprocess.run(["wgx", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout.strip()
    return priv, pub


def write_conf(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    os.chmod(path, 0o600)
    return path


def test_keys_are_interchangeable_with_wg(tmp_path: Path) -> None:
    k = tmp_path / "k"
    assert subprocess.run(["wgx", "genkey", str(k)], check=True).returncode == 0
    assert stat.S_IMODE(os.stat(k).st_mode) == 0o600
    priv = k.read_text().strip()
    ours = subprocess.run(["wgx", "pubkey"], input=priv, capture_output=True, text=True,
                          check=True).stdout
    theirs = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                            check=True).stdout
    assert ours == theirs and len(ours.strip()) == 44
    wg_priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout
    assert subprocess.run(["wgx", "pubkey"], input=wg_priv, capture_output=True,
                          text=True).stdout == subprocess.run(
        ["wg", "pubkey"], input=wg_priv, capture_output=True, text=True).stdout
    psk = subprocess.run(["wgx", "genpsk"], capture_output=True, text=True).stdout.strip()
    assert len(psk) == 44 and psk.endswith("=")
    bad = subprocess.run(["wgx", "pubkey"], input="nonsense", capture_output=True, text=True)
    assert bad.returncode == 1 and "base64" in bad.stderr


def full_conf(lab: netlab.Lab, h: netlab.Host) -> tuple[Path, dict[str, str]]:
    priv, _ = keypair(h)
    (_, p1), (_, p2) = keypair(h), keypair(h)
    conf = write_conf(h.dir / "wgc0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        ListenPort = 51830
        Address = 10.99.0.1/24, fd99::1/64
        Address = 10.99.9.1/32
        MTU = 1380

        [Peer]
        # the hub: everything goes there
        PublicKey = {p1}
        Endpoint = 198.18.0.2:51820
        AllowedIPs = 0.0.0.0/0, ::/0

        [Peer]
        PublicKey = {p2}
        AllowedIPs = 10.99.5.0/24, fd99:5::/64
        PersistentKeepalive = 25
    """)
    return conf, {"p1": p1, "p2": p2}


def test_up_down_two_peers_default_route(lab: netlab.Lab) -> None:
    h = lab.a
    conf, keys = full_conf(lab, h)
    with NetConf(h.name) as nc:
        rules_before = {v: nc.rules(v) for v in (4, 6)}
    # The default dataplane is auto: the endpoint routes via the lab's veth, which has
    # native XDP, so the fast path is attached (the pre-fork compile takes seconds).
    cp = wgx(h, "up", str(conf))
    assert cp.returncode == 0, cp.stderr
    with NetConf(h.name) as nc:
        info = nc.link_info("wgc0")
        assert info["mtu"] == 1380 and info["up"]
        addrs = {str(a) for a in nc.addresses("wgc0")}
        assert {"10.99.0.1/24", "fd99::1/64", "10.99.9.1/32"} <= addrs
        main = {str(n) for n in nc.routes("wgc0")}
        assert {"10.99.5.0/24", "fd99:5::/64"} <= main
        assert "0.0.0.0/0" not in main and "::/0" not in main
        table = {str(n) for n in nc.routes("wgc0", table=51820)}
        assert table == {"0.0.0.0/0", "::/0"}
        for v in (4, 6):
            rules = nc.rules(v)
            assert {"priority": 32765, "table": 51820, "fwmark": 51820, "invert": True,
                    "suppress_prefixlength": 0xFFFFFFFF} in rules
            assert any(r["priority"] == 32764 and r["table"] == 254
                       and r["suppress_prefixlength"] == 0 for r in rules)
    shown = json.loads(wgx(h, "show", "wgc0", "--json").stdout)
    assert shown["fwmark"] == 51820 and shown["listen_port"] == 51830
    assert shown["private_key"] == "(hidden)" and shown["dataplane"] == "xdp"
    assert shown["xdp"]["iface"] == "ul0" and shown["xdp"]["attach_mode"] == "native"
    assert len(shown["workers"]) >= 1
    peers = {p["public_key"]: p for p in shown["peers"]}
    assert peers[keys["p1"]]["allowed_ips"] == ["0.0.0.0/0", "::/0"]
    assert peers[keys["p2"]]["persistent_keepalive"] == 25
    assert "PrivateKey" not in wgx(h, "show", "wgc0").stdout

    cp = wgx(h, "down", str(conf))
    assert cp.returncode == 0, cp.stderr
    with NetConf(h.name) as nc:
        assert nc.link_index("wgc0") is None
        assert {v: nc.rules(v) for v in (4, 6)} == rules_before
        assert not nc.table_in_use(51820)
    assert netlab.wait_until(lambda: not h.socket_path("wgc0").exists(), timeout=5)
    assert not Path(f"/run/wgx/{h.name}/wgc0.json").exists()
    assert "xdp" not in h.ip("-d", "link", "show", "ul0")  # the program left with the daemon


def test_api_up_peers_down(lab: netlab.Lab) -> None:
    """The Python API drives the same steps; run in a child with the private UAPI dir."""
    h = lab.a
    conf, keys = full_conf(lab, h)
    script = textwrap.dedent(f"""
        import json
        from wgx import Interface
        iface = Interface.from_config({str(conf)!r}, netns={h.name!r})
        iface.up()
        peers = sorted(p.persistent_keepalive for p in iface.peers)
        up = iface.is_up()
        iface.down()
        print(json.dumps({{"peers": peers, "up": up, "after": iface.is_up()}}))
    """)
    netlab._ensure_run_wireguard()
    cp = subprocess.run(["unshare", "-m", "sh", "-c", _UAPI_SH, str(h.uapi_dir),
                         sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {"peers": [0, 25], "up": True, "after": False}


@pytest.mark.parametrize("body,line,message", [
    ("[Interface]\nPrivateKey = {priv}\nBogusKey = 1\n", 3, "unknown"),
    ("[Interface]\nPrivateKey = notbase64\n", 2, "PrivateKey"),
    ("[Interface]\nPrivateKey = {priv}\nAddress = 10.99.0.1/33\n", 3, "Address"),
    ("[Interface]\nPrivateKey = {priv}\n\n[Peer]\nPublicKey = {pub}\n\n[Peer]\n"
     "PublicKey = {pub}\n", 8, "duplicate"),
    ("[Interface]\nPrivateKey = {priv}\n[Peer]\nPublicKey = {pub}\nAllowedIPs = 10.1/8x\n",
     5, "AllowedIPs"),
])
def test_bad_config_is_file_line_exit_2_and_changes_nothing(
        lab: netlab.Lab, body: str, line: int, message: str) -> None:
    h = lab.a
    priv, pub = keypair(h)
    conf = write_conf(h.dir / "wgbad0.conf", body.format(priv=priv, pub=pub))
    cp = wgx(h, "up", str(conf))
    assert cp.returncode == 2
    err = cp.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {conf}:{line}: ")
    assert message.lower() in err[0].lower()
    with NetConf(h.name) as nc:
        assert nc.link_index("wgbad0") is None
    assert not h.socket_path("wgbad0").exists()


def test_missing_file(lab: netlab.Lab) -> None:
    cp = wgx(lab.a, "up", str(lab.a.dir / "nope0.conf"))
    assert cp.returncode == 2 and "nope0.conf:0:" in cp.stderr


def test_bare_conf_name_in_cwd_is_the_file(lab: netlab.Lab,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`wgx up wgc1.conf` next to wgc1.conf reads it (issue 15; wg-quick would read
    /etc/wireguard/wgc1.conf.conf); `down` resolves it the same way. A bare NAME.conf
    that exists nowhere is one clear error line, exit 2."""
    h = lab.a
    priv, _ = keypair(h)
    write_conf(h.dir / "wgc1.conf", f"[Interface]\nPrivateKey = {priv}\nListenPort = 51831\n")
    monkeypatch.chdir(h.dir)
    try:
        cp = wgx(h, "up", "wgc1.conf", "--dataplane", "socket")
        assert cp.returncode == 0, cp.stderr
        with NetConf(h.name) as nc:
            assert nc.link_info("wgc1")["up"]
    finally:
        cp = wgx(h, "down", "wgc1.conf")
        state_dir = Path(f"/run/wgx/{h.name}")
        (state_dir / "wgc1.log").unlink(missing_ok=True)  # a daemon log kept after down
        with contextlib.suppress(OSError):
            state_dir.rmdir()  # only if empty
    assert cp.returncode == 0, cp.stderr
    with NetConf(h.name) as nc:
        assert nc.link_index("wgc1") is None
    cp = wgx(h, "up", "nope1.conf")
    assert cp.returncode == 2
    assert cp.stderr.strip().splitlines() == [
        "error: nope1.conf:0: no such file (and, read as an interface name as wg-quick would,"
        " no /etc/wireguard/nope1.conf.conf either)"]


def test_failure_halfway_rolls_back(lab: netlab.Lab) -> None:
    """The listen port is taken: up fails after the daemon started, and undoes it all."""
    h = lab.a
    blocker = h.popen([sys.executable, "-c",
                       "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                       "s.bind(('0.0.0.0',51830)); print('ok',flush=True); time.sleep(60)"],
                      stdout=subprocess.PIPE, text=True)
    assert blocker.stdout.readline().strip() == "ok"
    conf, _ = full_conf(lab, h)
    cp = wgx(h, "up", str(conf))
    assert cp.returncode == 1
    assert "51830" in cp.stderr or "in use" in cp.stderr.lower()
    with NetConf(h.name) as nc:
        assert nc.link_index("wgc0") is None
        assert not nc.table_in_use(51820)
        assert not any(r["table"] == 51820 for r in nc.rules(4))
    assert netlab.wait_until(lambda: not h.socket_path("wgc0").exists(), timeout=5)


def test_set_showconf_and_wg_tool(lab: netlab.Lab) -> None:
    h = lab.a
    priv, _ = keypair(h)
    _, pub = keypair(h)
    conf = write_conf(h.dir / "wgs0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        Address = 10.99.0.1/24
    """)
    assert wgx(h, "up", str(conf)).returncode == 0
    cp = wgx(h, "set", "wgs0", "listen-port", "51999", "peer", pub, "endpoint",
             "198.18.0.2:51820", "allowed-ips", "10.99.0.2/32,fd99::2/128",
             "persistent-keepalive", "off")
    assert cp.returncode == 0, cp.stderr
    dump = lab.wg_show_dump(h, "wgs0")  # the real wg reads what wgx set
    assert dump["listen_port"] == 51999
    assert dump["peers"][pub]["allowed_ips"] == ["10.99.0.2/32", "fd99::2/128"]
    bad = wgx(h, "set", "wgs0", "peer", pub, "allowed-ips", "10.0.0.300/8")
    assert bad.returncode == 2 and "allowed-ips" in bad.stderr
    shown = wgx(h, "showconf", "wgs0").stdout
    assert "ListenPort = 51999" in shown and f"PublicKey = {pub}" in shown
    (h.dir / "again.conf").write_text(shown)
    h.wg("setconf", "wgs0", str(h.dir / "again.conf"))
    assert wgx(h, "showconf", "wgs0").stdout == shown
    assert wgx(h, "down", "wgs0", "--netns", h.name, netns=False).returncode != 0  # no file
    assert wgx(h, "down", str(conf)).returncode == 0


def test_save_config_writes_back(lab: netlab.Lab) -> None:
    h = lab.a
    priv, _ = keypair(h)
    _, pub = keypair(h)
    conf = write_conf(h.dir / "wgv0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        Address = 10.99.0.1/24
        SaveConfig = true
    """)
    assert wgx(h, "up", str(conf)).returncode == 0
    assert wgx(h, "set", "wgv0", "peer", pub, "allowed-ips", "10.99.7.0/24").returncode == 0
    assert wgx(h, "down", str(conf)).returncode == 0
    text = conf.read_text()
    assert f"PublicKey = {pub}" in text and "10.99.7.0/24" in text
    assert "SaveConfig = true" in text and "Address = 10.99.0.1/24" in text
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600


def test_exporter_metrics(lab: netlab.Lab) -> None:
    h = lab.a
    conf, keys = full_conf(lab, h)
    assert wgx(h, "up", str(conf)).returncode == 0
    exp = h.popen(["unshare", "-m", "sh", "-c", _UAPI_SH, str(h.uapi_dir), "wgx", "exporter",
                   "--listen", "127.0.0.1:9586"], stderr=subprocess.PIPE)
    fetch = ("import urllib.request,time\n"
             "for _ in range(50):\n"
             "    try:\n"
             "        print(urllib.request.urlopen('http://127.0.0.1:9586/metrics').read()"
             ".decode()); break\n"
             "    except OSError: time.sleep(0.1)\n")
    deadline = time.monotonic() + 10
    body = ""
    while "wireguard_peer" not in body and time.monotonic() < deadline:
        body = h.run([sys.executable, "-c", fetch]).stdout
    exp.terminate()
    assert f'wireguard_peer_receive_bytes_total{{interface="wgc0",public_key="{keys["p1"]}"}}' \
        in body
    assert "wireguard_peer_transmit_bytes_total" in body
    assert "wireguard_peer_last_handshake_seconds" in body
    assert "# TYPE wgx_drops_total counter" in body or "wgx_" not in body
    assert wgx(h, "down", str(conf)).returncode == 0


def test_help_has_examples() -> None:
    for cmd in ("up", "down", "show", "showconf", "set", "genkey", "pubkey", "genpsk",
                "exporter"):
        out = subprocess.run(["wgx", cmd, "--help"], capture_output=True, text=True).stdout
        assert "Example" in out, cmd


def test_hooks_run_in_order_with_iface_substituted(lab: netlab.Lab) -> None:
    h = lab.a
    priv, _ = keypair(h)
    log = h.dir / "hooks.log"
    conf = write_conf(h.dir / "wgh0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        Address = 10.99.0.1/24
        PreUp = echo pre-up %i >> {log}
        PostUp = echo post-up %i $(cat /sys/class/net/%i/mtu) >> {log}
        PreDown = echo pre-down %i >> {log}
        PostDown = echo post-down %i >> {log}
    """)
    assert wgx(h, "up", str(conf), "--dataplane", "socket").returncode == 0
    assert wgx(h, "down", str(conf)).returncode == 0
    assert log.read_text().split("\n")[:4] == [
        "pre-up wgh0", "post-up wgh0 1420", "pre-down wgh0", "post-down wgh0"]


def test_failing_postup_hook_rolls_back(lab: netlab.Lab) -> None:
    h = lab.a
    priv, _ = keypair(h)
    conf = write_conf(h.dir / "wgf0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        Address = 10.99.0.1/24
        PostUp = false
    """)
    cp = wgx(h, "up", str(conf), "--dataplane", "socket")
    assert cp.returncode == 1 and "PostUp hook failed" in cp.stderr
    with NetConf(h.name) as nc:
        assert nc.link_index("wgf0") is None
    assert netlab.wait_until(lambda: not h.socket_path("wgf0").exists(), timeout=5)


def test_allowed_ips_equal_to_the_address_route(lab: netlab.Lab) -> None:
    """wg-quick skips an AllowedIPs route the device already has (its Address subnet)."""
    h = lab.a
    priv, _ = keypair(h)
    _, pub = keypair(h)
    conf = write_conf(h.dir / "wge0.conf", f"""
        [Interface]
        PrivateKey = {priv}
        Address = 10.99.0.1/24

        [Peer]
        PublicKey = {pub}
        AllowedIPs = 10.99.0.0/24
    """)
    cp = wgx(h, "up", str(conf), "--dataplane", "socket")
    assert cp.returncode == 0, cp.stderr
    with NetConf(h.name) as nc:
        assert [str(n) for n in nc.routes("wge0")].count("10.99.0.0/24") == 1
    assert wgx(h, "down", str(conf)).returncode == 0
