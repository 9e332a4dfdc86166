"""`wgx lab`: the netns lab up and down (2 and 3 hosts), cleanup after `down` and after
a killed `wgx lab up`, the shared provisioning script, and the Vagrantfile.

Every lab here gets a unique name, so its namespaces (NAME-alpha, ...) never
collide with another run's; a fixture takes it down whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import in_ci

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "provision-host.sh"
STATE_ROOT = Path("/run/wgx-lab")


def wgx(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(["wgx", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert cp.returncode == 0, f"wgx {' '.join(args)}: rc={cp.returncode}\n{cp.stderr}"
    return cp


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def assert_clean(name: str, pids: list[int] = ()) -> None:
    left = sorted(ns for ns in namespaces() if ns.startswith(f"{name}-"))
    assert not left, f"namespaces left behind: {left}"
    assert not (STATE_ROOT / name).exists(), f"{STATE_ROOT / name} left behind"
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], f"processes left behind: {pids}"



def exec_ok(name: str, host: str, *cmd: str) -> str:
    cp = wgx("lab", "exec", host, "--name", name, "--", *cmd, timeout=60)
    return cp.stdout


def status(name: str) -> dict:
    return json.loads(wgx("lab", "status", "--name", name, "--json").stdout)


def daemon_pids(st: dict) -> list[int]:
    return [p for h in st["hosts"] for v in h["pids"].values() for p in v]


# ------------------------------------------------------------------------ netns lab


@pytest.mark.privileged
def test_two_hosts_up_ping_down(lab_name: str) -> None:
    t0 = time.monotonic()
    wgx("lab", "up", "--name", lab_name, "--queues", "2", "--dataplane", "xdp")
    up_s = time.monotonic() - t0
    st = status(lab_name)
    assert [h["host"] for h in st["hosts"]] == ["alpha", "beta"]
    assert all(st["namespaces"].values())
    for h in st["hosts"]:
        assert h["impl"] == "wgx" and h["netns_ok"]
        assert h["dataplane"] == "xdp", h
        assert len(h["pids"]["daemon"]) == 1
        assert len(h["pids"]["workers"]) == 2, "one worker per veth queue"
        assert h["peers"] and h["peers"][0]["endpoint"].startswith("198.18.0.")
    # the veth has 2 queues, seen from inside the namespace
    assert "RX:\t\t2" in exec_ok(lab_name, "alpha", "ethtool", "-l", "ul0")
    out = exec_ok(lab_name, "alpha", "ping", "-n", "-c", "3", "-i", "0.1", "-W", "2",
                  "10.99.0.2")
    assert " 0% packet loss" in out
    out = exec_ok(lab_name, "beta", "ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", "fd99::1")
    assert " 0% packet loss" in out
    # the private /run/wireguard makes `wg` and `wgx show` work inside a host
    assert "latest handshake" in exec_ok(lab_name, "alpha", "wg", "show", "wg0")
    assert "dataplane: xdp" in exec_ok(lab_name, "beta", "wgx", "show", "wg0")
    # exec passes the exit code through
    assert wgx("lab", "exec", "alpha", "--name", lab_name, "--", "false",
               check=False).returncode == 1
    pids = daemon_pids(st)
    wgx("lab", "down", "--name", lab_name)
    assert_clean(lab_name, pids)
    print(f"2-host xdp lab up in {up_s:.1f}s")


@pytest.mark.privileged
@pytest.mark.parametrize("topology", ["hub", "mesh"])
def test_three_hosts(lab_name: str, topology: str) -> None:
    args = ["lab", "up", "--name", lab_name, "--hosts", "3", "--topology", topology,
            "--dataplane", "socket", "--queues", "1"]
    if topology == "mesh":
        args += ["--peer-impl", "wireguard-go"]  # gamma runs wireguard-go (wg-quick)
    wgx(*args)
    st = status(lab_name)
    assert [h["host"] for h in st["hosts"]] == ["alpha", "beta", "gamma"]
    assert f"{lab_name}-sw" in st["namespaces"], "N>2 hosts hang off a bridge namespace"
    impls = [h["impl"] for h in st["hosts"]]
    assert impls == (["wgx", "wgx", "wireguard-go"] if topology == "mesh" else ["wgx"] * 3)
    peers = [len(h["peers"]) for h in st["hosts"]]
    assert peers == ([2, 1, 1] if topology == "hub" else [2, 2, 2])
    # spoke to spoke: through the hub (hub), or directly (mesh)
    out = exec_ok(lab_name, "beta", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2",
                  "10.99.0.3")
    assert " 0% packet loss" in out
    out = exec_ok(lab_name, "gamma", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2",
                  "fd99::2")
    assert " 0% packet loss" in out
    pids = daemon_pids(st)
    assert len(pids) == 3
    wgx("lab", "down", "--name", lab_name)
    assert_clean(lab_name, pids)


@pytest.mark.privileged
def test_failed_ping_shows_the_daemon_logs(lab_name: str) -> None:
    """A lab whose tunnel cannot ping says why: the last lines of the daemons' logs
    (here: workers that crash on every packet, so the `xdp` daemons stop)."""
    cp = subprocess.run(["wgx", "lab", "up", "--name", lab_name, "--dataplane", "xdp"],
                        capture_output=True, text=True, timeout=180,
                        env={**os.environ, "WGX_TEST_WORKER_FAULT": "rx"})
    print(cp.stderr[-1500:])
    assert cp.returncode != 0
    assert f"lab {lab_name}: alpha cannot ping beta" in cp.stderr, cp.stderr
    assert "last lines of the daemon log" in cp.stderr, cp.stderr
    assert "fast path failed: workers died 3 times" in cp.stderr, cp.stderr
    assert "injected fault in rx" in cp.stderr, cp.stderr
    assert_clean(lab_name)


@pytest.mark.privileged
def test_down_after_killed_up(lab_name: str) -> None:
    """SIGKILL `wgx lab up` (and everything it started) half-way; `down` still cleans up."""
    proc = subprocess.Popen(["wgx", "lab", "up", "--name", lab_name, "--dataplane", "socket",
                             "--junk"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = STATE_ROOT / lab_name / "state.json"
    deadline = time.monotonic() + 60
    # wait until the first tunnel is being provisioned: namespaces, veth and keys exist
    while time.monotonic() < deadline:
        try:
            hosts = json.loads(state.read_text())["hosts"]
        except (OSError, ValueError, KeyError):
            hosts = []
        if hosts and hosts[0].get("up"):
            break
        assert proc.poll() is None, "wgx lab up ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside provisioning
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert state.exists()
    assert any(ns.startswith(f"{lab_name}-") for ns in namespaces())
    cp = wgx("lab", "status", "--name", lab_name, "--json")
    assert json.loads(cp.stdout)["owner_alive"] is False
    # a second `up` refuses and says what to do
    cp = wgx("lab", "up", "--name", lab_name, check=False)
    assert cp.returncode != 0 and "lab down" in cp.stderr
    wgx("lab", "down", "--name", lab_name)
    assert_clean(lab_name)


@pytest.mark.privileged
def test_foreign_namespace_is_not_touched(lab_name: str) -> None:
    foreign = f"{lab_name}-beta"
    subprocess.run(["ip", "netns", "add", foreign], check=True, timeout=10)
    try:
        cp = wgx("lab", "up", "--name", lab_name, "--dataplane", "socket", check=False)
        assert cp.returncode != 0
        assert "not this lab's" in cp.stderr
        assert foreign in namespaces()
        assert not (STATE_ROOT / lab_name).exists()
        cp = wgx("lab", "down", "--name", lab_name, check=False)
        assert cp.returncode != 0 and "no lab" in cp.stderr
        assert foreign in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], timeout=10)


# ----------------------------------------------------------- shared provisioning


def test_provision_script_hub_configs(tmp_path: Path) -> None:
    """Keys for all hosts once, and per-host wg-quick configs (hub: spokes via the hub)."""
    hosts = "alpha beta gamma"
    for h in hosts.split():
        subprocess.run(["bash", str(SCRIPT), h, "--lab-dir", str(tmp_path), "--hosts", hosts,
                        "--topology", "hub", "--action", "config"], check=True,
                       capture_output=True, timeout=60)
    keys = sorted(p.name for p in (tmp_path / "keys").iterdir() if not p.name.startswith("."))
    assert keys == ["alpha.key", "alpha.pub", "beta.key", "beta.pub", "gamma.key", "gamma.pub"]
    assert (tmp_path / "keys" / "alpha.key").stat().st_mode & 0o077 == 0
    hub = (tmp_path / "alpha" / "wg0.conf").read_text()
    spoke = (tmp_path / "gamma" / "wg0.conf").read_text()
    assert hub.count("[Peer]") == 2 and "ip_forward=1" in hub
    assert "Address = 10.99.0.1/24, fd99::1/64" in hub
    assert "Endpoint = 198.18.0.3:51820" in hub
    assert spoke.count("[Peer]") == 1
    assert "Address = 10.99.0.3/32, fd99::3/128" in spoke
    assert "AllowedIPs = 10.99.0.0/24, fd99::/64" in spoke
    assert (tmp_path / "keys" / "alpha.pub").read_text().strip() in spoke
    # idempotent: the keys stay
    before = (tmp_path / "keys" / "beta.key").read_text()
    subprocess.run(["bash", str(SCRIPT), "beta", "--lab-dir", str(tmp_path), "--hosts", hosts,
                    "--underlay-offset", "10", "--action", "config"], check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "keys" / "beta.key").read_text() == before
    assert "Endpoint = 198.18.0.11:51820" in (tmp_path / "beta" / "wg0.conf").read_text()


# ------------------------------------------------------------------------ Vagrant


def test_vagrant_validate(tmp_path: Path) -> None:
    """The Vagrantfile parses (providers ignored: no VMs are started)."""
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        if in_ci():
            pytest.fail("vagrant is not installed (CI=true: .ci/run installs Debian's vagrant)")
        pytest.skip("vagrant is not installed (apt-get install --no-install-recommends vagrant)")
    # a copy, so that validate's .vagrant/ directory does not land in the repo
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"), VAGRANT_CHECKPOINT_DISABLE="1")
    cp = subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "validated successfully" in cp.stdout
