"""Network-namespace lab for interop tests of WireGuard userspace implementations.

Every "host" is a network namespace created here (random suffix, so parallel or
leftover runs never collide) with a private UAPI directory.  An implementation
under test follows wireguard-go's command-line contract:

    IMPL -f IFACE      foreground: creates TUN IFACE and /var/run/wireguard/IFACE.sock

and is configured with the real ``wg`` tool.  The UAPI path is one filesystem
path shared by all namespaces, so the daemon and every ``wg`` call run in a
private mount namespace in which the host's private directory is bind-mounted
over /run/wireguard::

    ip netns exec NS unshare -m sh -c 'mount --bind DIR /run/wireguard && exec CMD...'

(util-linux ``unshare -m`` makes the new mount namespace's propagation private,
so the bind mount never shows up in the root mount namespace.)

Network safety: all addresses and routes live in namespaces created here
(underlay 198.18.0.0/15 + fd18::/64, overlay 10.99.0.0/16 + fd99::/64).  Teardown
only touches namespaces, processes and directories that this module created;
every subprocess has a timeout.

Typical use::

    with Lab() as lab:
        tun = lab.tunnel(["wireguard-go"], ["wireguard-go"], underlay="v4", psk=True)
        lab.ping(lab.a, tun.overlay4(lab.b))
        sent, received = lab.tcp_transfer_sha256(lab.a, lab.b, tun.overlay4(lab.b), 50 << 20)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

NS_PREFIX = "wgxt"
RUN_WG = Path("/run/wireguard")  # /var/run -> /run on Debian
# Registry of namespaces created by this module ("<pid> <starttime> <netns inode>"),
# used by sweep_stale() to clean up after runs that were SIGKILLed.  /run is a
# tmpfs, so it lives exactly as long as the namespaces themselves.
REGISTRY = Path("/run/wgx-netlab")
DEFAULT_TIMEOUT = 20.0
DAEMON_START_TIMEOUT = 10.0
UNDERLAY_IF = "ul0"
UNDERLAY_QUEUES = 2  # RX/TX queue pairs on each veth end: one per XDP worker

# "Bind DIR over /run/wireguard, then exec the command": $0 is DIR, "$@" the command.
_UAPI_SH = 'mount --bind "$0" /run/wireguard && exec "$@"'


class NetlabError(RuntimeError):
    """A lab operation failed; the message carries the command's output."""


# --------------------------------------------------------------------------- helpers


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _read_log(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return _tail(path.read_text(errors="replace"))
    except OSError:
        return ""


def _proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in jiffies): guards against PID reuse."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[19]


def _ns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill_pids(pids: Iterable[int], grace: float = 3.0) -> None:
    """TERM, wait up to `grace` s, then KILL."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and _proc_state(p) != "Z"]
        if not pids:
            return
        time.sleep(0.05)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _terminate(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """Stop a Popen child: TERM, wait `grace` s, KILL.  Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    return proc.returncode


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn: SIGKILL the child if the test process dies (survives execve).

    Note: the signal fires when the *thread* that forked exits, so create labs
    from a thread that outlives them (pytest's main thread does).
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(
            list(cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
        )
    except subprocess.TimeoutExpired as e:
        raise NetlabError(
            f"timed out after {timeout}s: {' '.join(cmd)}\n"
            f"stdout: {_tail(str(e.stdout or ''))}\n"
            f"stderr: {_tail(str(e.stderr or ''))}"
        ) from None
    if check and cp.returncode != 0:
        raise NetlabError(
            f"command failed (rc={cp.returncode}): {' '.join(cmd)}\n"
            f"stdout: {_tail(cp.stdout)}\nstderr: {_tail(cp.stderr)}"
        )
    return cp


def wait_until(
    pred: Any, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll pred() until it returns something truthy; NetlabError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise NetlabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


T = TypeVar("T")
_UNSET = object()


def wait_stable(read: Callable[[], T], timeout: float, interval: float, what: str) -> T:
    """Call `read` every `interval` s until two results in a row are equal; return it.

    Raises AssertionError naming `what` if it is still changing after `timeout` s.
    """
    prev: Any = _UNSET
    deadline = time.monotonic() + timeout
    while True:
        cur = read()
        if cur == prev:
            return cur
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still moving after {timeout}s: {cur}")
        prev = cur
        time.sleep(interval)


def environment_problems() -> list[str]:
    """Reasons why privileged lab tests cannot run here (empty list: they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun is missing")
    for tool in ("ip", "unshare", "mount", "ping"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found in PATH")
    if shutil.which("ip") is not None:
        try:
            cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
            if cp.returncode != 0:
                problems.append(f"`ip netns list` failed: {cp.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"`ip netns list` failed: {e}")
    return problems


# ----------------------------------------------------------- /run/wireguard mountpoint

_runwg_lock = threading.Lock()
_RUNWG_MARK = "created-run-wireguard"  # in REGISTRY: "<pid> <starttime>" of the creator
_runwg_created = False  # this process created /run/wireguard
_runwg_users = 0  # labs of this process currently using it


def _mark_run_wireguard_created() -> None:
    global _runwg_created
    _runwg_created = True
    with contextlib.suppress(OSError):
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        (REGISTRY / _RUNWG_MARK).write_text(_owner() + "\n")


def _acquire_run_wireguard() -> None:
    global _runwg_users
    with _runwg_lock:
        if not RUN_WG.is_dir():
            try:
                RUN_WG.mkdir(mode=0o755)
                _mark_run_wireguard_created()
            except FileExistsError:
                pass
        _runwg_users += 1


def _ensure_run_wireguard() -> None:
    """Re-create the mountpoint if something removed it while we use it (e.g. a
    concurrent script that created and removed it); then it counts as ours."""
    if not RUN_WG.is_dir():
        with _runwg_lock:
            try:
                RUN_WG.mkdir(mode=0o755)
                _mark_run_wireguard_created()
            except FileExistsError:
                pass


def _run_wireguard_mounted_anywhere() -> bool:
    """True if any process has something mounted on /run/wireguard (e.g. another lab)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/mountinfo") as f:
                for line in f:
                    mnt = line.split(" ", 5)[4]
                    if mnt in ("/run/wireguard", "/var/run/wireguard"):
                        return True
        except (OSError, IndexError):
            continue
    return False


def _release_run_wireguard() -> None:
    """Remove /run/wireguard if this process created it and nobody uses it any more.

    Removing a directory that is a mountpoint in another mount namespace detaches
    that mount there (Linux >= 3.18), which would break a concurrent lab, so
    check every process's mountinfo first.
    """
    global _runwg_created, _runwg_users
    with _runwg_lock:
        _runwg_users = max(0, _runwg_users - 1)
        if _runwg_users:
            return
        # Also adopt the directory if the lab process that created it has died
        # meanwhile (it skipped removal because we still had it mounted).
        if not (_runwg_created or _creator_marker_orphaned()):
            return
        if _run_wireguard_mounted_anywhere():
            return
        try:
            RUN_WG.rmdir()  # fails if not empty: then someone else put a socket there
        except FileNotFoundError:
            pass
        except OSError:
            return
        _runwg_created = False
        with contextlib.suppress(OSError):
            (REGISTRY / _RUNWG_MARK).unlink()
        with contextlib.suppress(OSError):
            REGISTRY.rmdir()


# ------------------------------------------------------------------- stale sweeping


def _owner() -> str:
    return f"{os.getpid()} {_proc_starttime(os.getpid())}"


def _register_ns(name: str, inode: int, workdir: Path) -> None:
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    (REGISTRY / name).write_text(f"{_owner()} {inode} {workdir}\n")


def _creator_marker_orphaned() -> bool:
    try:
        pid_s, start = (REGISTRY / _RUNWG_MARK).read_text().split()
    except (OSError, ValueError):
        return False
    return _owner_dead(pid_s, start)


def _owner_dead(pid_s: str, start: str) -> bool:
    pid = int(pid_s)
    return _proc_starttime(pid) != start or _proc_state(pid) in (None, "Z", "X")


def _unregister_ns(name: str) -> None:
    with contextlib.suppress(OSError):
        (REGISTRY / name).unlink()
    with contextlib.suppress(OSError):
        REGISTRY.rmdir()  # only succeeds once no lab (of any process) is registered


def sweep_stale() -> list[str]:
    """Delete namespaces left behind by earlier lab runs whose process is dead.

    Only namespaces recorded in REGISTRY by this module, still with the recorded
    inode (so not a same-named namespace made by someone else), and whose owning
    process (pid + start time) no longer exists are touched.  Processes inside
    such a namespace were started by that lab and are killed.  Returns the names
    deleted.
    """
    removed: list[str] = []
    if not REGISTRY.is_dir():
        return removed
    for rec in REGISTRY.iterdir():
        if rec.name == _RUNWG_MARK:
            continue
        try:
            pid_s, start, ino_s, workdir = rec.read_text().split(maxsplit=3)
        except (OSError, ValueError):
            continue
        if not _owner_dead(pid_s, start):
            continue  # owner still alive
        wd = Path(workdir.strip())
        if wd.name.startswith(f"{NS_PREFIX}-lab-") and wd.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(wd, ignore_errors=True)
        inode = _ns_inode(rec.name)
        if inode is not None and inode == int(ino_s):
            _kill_pids(_pids_in_netns(inode))
            if (
                subprocess.run(
                    ["ip", "netns", "del", rec.name], capture_output=True, timeout=DEFAULT_TIMEOUT
                ).returncode
                == 0
            ):
                removed.append(rec.name)
        with contextlib.suppress(OSError):
            rec.unlink()
    mark = REGISTRY / _RUNWG_MARK
    if _creator_marker_orphaned() and not _runwg_users:
        if not _run_wireguard_mounted_anywhere():
            with contextlib.suppress(OSError):
                RUN_WG.rmdir()
        with contextlib.suppress(OSError):
            mark.unlink()
    with contextlib.suppress(OSError):
        REGISTRY.rmdir()
    return removed


# ---------------------------------------------------------------------------- Host


class Host:
    """One network namespace with a private UAPI directory."""

    def __init__(self, label: str, workdir: Path):
        self.label = label
        self.name = f"{NS_PREFIX}-{label}-{secrets.token_hex(3)}"
        self.dir = Path(workdir) / label
        self.dir.mkdir(mode=0o700)
        self.uapi_dir = self.dir / "uapi"
        # 0755 like the /var/run/wireguard that wireguard-go creates (MkdirAll 0755);
        # the enclosing lab directory is 0700, so keys stay private.
        self.uapi_dir.mkdir()
        os.chmod(self.uapi_dir, 0o755)
        self.procs: list[subprocess.Popen] = []
        self.daemon: subprocess.Popen | None = None
        self.daemon_iface: str | None = None
        self.daemon_log: Path | None = None
        self.inode: int | None = None
        # filled in by Lab
        self.underlay: dict[str, str] = {}  # "v4"/"v6" -> address without prefix
        self.private_key_file: Path | None = None
        self.public_key: str | None = None
        self.listen_port: int | None = None

    def __repr__(self) -> str:
        return f"Host({self.label!r}, ns={self.name!r})"

    # -- lifecycle
    def create(self) -> None:
        _run(["ip", "netns", "add", self.name])
        self.inode = _ns_inode(self.name)
        if self.inode is None:
            raise NetlabError(f"netns {self.name} vanished right after creation")
        _register_ns(self.name, self.inode, self.dir.parent)
        self.ip("link", "set", "lo", "up")
        # Deleting a primary IPv4 address must not take the other ones with it
        # (move_endpoint adds the new address before deleting the old one).
        self.run(
            [
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.promote_secondaries=1",
                "net.ipv4.conf.default.promote_secondaries=1",
            ]
        )

    def close(self) -> None:
        """Stop every process started here, then delete the namespace (only ours)."""
        errors = []
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.stop_daemon()
        for p in self.procs:
            try:
                _terminate(p, grace=3)
            except Exception as e:  # keep tearing down
                errors.append(repr(e))
        self.procs.clear()
        if self.inode is not None and _ns_inode(self.name) == self.inode:
            # Anything still inside a namespace we created was started through us.
            _kill_pids(_pids_in_netns(self.inode))
            cp = subprocess.run(
                ["ip", "netns", "del", self.name],
                capture_output=True,
                text=True,
                timeout=DEFAULT_TIMEOUT,
            )
            if cp.returncode != 0:
                errors.append(f"ip netns del {self.name}: {cp.stderr.strip()}")
        if self.inode is not None:
            _unregister_ns(self.name)
        self.inode = None
        if errors:
            raise NetlabError(f"teardown of {self.name}: " + "; ".join(errors))

    # -- commands
    def nsexec(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def uapi_wrap(self, cmd: Sequence[str]) -> list[str]:
        """Command line running `cmd` in this netns with the private /run/wireguard."""
        _ensure_run_wireguard()
        return self.nsexec(["unshare", "-m", "sh", "-c", _UAPI_SH, str(self.uapi_dir), *cmd])

    def run(
        self,
        cmd: Sequence[str],
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` inside the namespace (text output captured)."""
        return _run(self.nsexec(cmd), check=check, timeout=timeout, input=input, env=env)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        uapi: bool = False,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen:
        """Start `cmd` in the namespace; the lab stops it at teardown (TERM, then KILL)."""
        argv = self.uapi_wrap(cmd) if uapi else self.nsexec(cmd)
        full_env = None
        if env is not None:
            full_env = dict(os.environ)
            full_env.update(env)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        kw.setdefault("preexec_fn", _die_with_parent)
        p = subprocess.Popen(argv, env=full_env, **kw)
        self.procs.append(p)
        return p

    def wg(self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run the real `wg` against this host's private UAPI directory; returns stdout."""
        return _run(self.uapi_wrap(["wg", *args]), check=check, timeout=timeout).stdout

    def ip(self, *args: str, check: bool = True) -> str:
        return _run(["ip", "-n", self.name, *args], check=check).stdout

    def addr_add(self, dev: str, cidr: str) -> None:
        extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        self.ip("addr", "add", cidr, "dev", dev, *extra)

    def addr_del(self, dev: str, cidr: str) -> None:
        self.ip("addr", "del", cidr, "dev", dev)

    def link_up(self, dev: str, mtu: int | None = None) -> None:
        args = ["link", "set", "dev", dev]
        if mtu is not None:
            args += ["mtu", str(mtu)]
        self.ip(*args, "up")

    def link_exists(self, dev: str) -> bool:
        return (
            _run(["ip", "-n", self.name, "link", "show", "dev", dev], check=False).returncode == 0
        )

    # -- daemon
    def socket_path(self, iface: str) -> Path:
        return self.uapi_dir / f"{iface}.sock"

    def start_daemon(
        self,
        impl_cmd: Sequence[str],
        iface: str,
        env: Mapping[str, str] | None = None,
        timeout: float = DAEMON_START_TIMEOUT,
    ) -> subprocess.Popen:
        """Run `impl_cmd -f iface` in the foreground under our control.

        Waits until the UAPI socket exists in the private directory and the TUN
        device exists in the namespace.  ip netns exec, unshare and sh all exec,
        so the Popen pid is the implementation's own pid.
        """
        if self.daemon is not None and self.daemon.poll() is None:
            raise NetlabError(f"{self}: a daemon is already running")
        if not impl_cmd:
            raise ValueError("empty implementation command")
        exe = shutil.which(impl_cmd[0])
        if exe is None:
            raise NetlabError(f"implementation {impl_cmd[0]!r} not found in PATH")
        self.daemon_log = self.dir / f"daemon-{iface}.log"
        sock = self.socket_path(iface)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        with open(self.daemon_log, "wb") as log:
            p = self.popen(
                [exe, *impl_cmd[1:], "-f", iface],
                uapi=True,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.daemon, self.daemon_iface = p, iface
        deadline = time.monotonic() + timeout
        while True:
            rc = p.poll()
            if rc is not None:
                raise NetlabError(
                    f"{self}: {' '.join(impl_cmd)} -f {iface} exited with rc={rc} before "
                    f"creating {sock.name}; output:\n{_read_log(self.daemon_log)}"
                )
            try:
                is_sock = stat.S_ISSOCK(os.stat(sock).st_mode)
            except FileNotFoundError:
                is_sock = False
            if is_sock and self.link_exists(iface):
                return p
            if time.monotonic() > deadline:
                what = "TUN device" if is_sock else "UAPI socket"
                self.stop_daemon()
                raise NetlabError(
                    f"{self}: {' '.join(impl_cmd)} -f {iface} did not create its {what} "
                    f"({sock}) within {timeout}s; output:\n{_read_log(self.daemon_log)}"
                )
            time.sleep(0.02)

    def stop_daemon(self, grace: float = 5.0) -> int | None:
        """TERM the daemon (KILL after `grace` s); returns its exit code."""
        p, self.daemon = self.daemon, None
        if p is None:
            return None
        rc = _terminate(p, grace=grace)
        with contextlib.suppress(ValueError):
            self.procs.remove(p)
        return rc

    def daemon_output(self) -> str:
        return _read_log(self.daemon_log)


# ----------------------------------------------------------------- wg show dump


def _parse_endpoint(ep: str) -> tuple[str, int] | None:
    if ep == "(none)":
        return None
    m = re.fullmatch(r"\[(.+)\]:(\d+)", ep) or re.fullmatch(r"([^:]+):(\d+)", ep)
    if not m:
        raise NetlabError(f"unparseable endpoint {ep!r}")
    return m.group(1), int(m.group(2))


def parse_wg_dump(text: str) -> dict[str, Any]:
    """Parse `wg show IFACE dump` (single interface form).

    Returns {"private_key", "public_key", "listen_port", "fwmark",
             "peers": {public_key: {"public_key", "preshared_key", "endpoint"
             ((addr, port) or None), "endpoint_raw", "allowed_ips" (list),
             "latest_handshake" (unix s, 0 = never), "rx_bytes", "tx_bytes",
             "persistent_keepalive" (s, 0 = off)}}}.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise NetlabError("empty wg dump")
    f = lines[0].split("\t")
    if len(f) != 4:
        raise NetlabError(f"bad interface line in wg dump: {lines[0]!r}")
    out: dict[str, Any] = {
        "private_key": f[0],
        "public_key": f[1],
        "listen_port": int(f[2]),
        "fwmark": None if f[3] == "off" else f[3],
        "peers": {},
    }
    for ln in lines[1:]:
        f = ln.split("\t")
        if len(f) != 8:
            raise NetlabError(f"bad peer line in wg dump: {ln!r}")
        out["peers"][f[0]] = {
            "public_key": f[0],
            "preshared_key": None if f[1] == "(none)" else f[1],
            "endpoint": _parse_endpoint(f[2]),
            "endpoint_raw": f[2],
            "allowed_ips": [] if f[3] == "(none)" else f[3].split(","),
            "latest_handshake": int(f[4]),
            "rx_bytes": int(f[5]),
            "tx_bytes": int(f[6]),
            "persistent_keepalive": 0 if f[7] == "off" else int(f[7]),
        }
    return out


# ----------------------------------------------------------------------------- Lab


class TransferResult(NamedTuple):
    sha256_sent: str
    sha256_received: str


@dataclass
class Tunnel:
    """What Lab.tunnel() set up."""

    iface: str
    underlay: str  # "v4" | "v6"
    psk: bool
    initiator: str  # "a" | "b"
    impl_a: list[str]
    impl_b: list[str]
    ports: dict[str, int] = field(default_factory=dict)  # label -> listen port at setup

    def overlay4(self, host: Host | str) -> str:
        return Lab.OVERLAY4[_label(host)]

    def overlay6(self, host: Host | str) -> str:
        return Lab.OVERLAY6[_label(host)]


def _label(host: Host | str) -> str:
    return host if isinstance(host, str) else host.label


_live_labs: set[Lab] = set()


@atexit.register
def _close_live_labs() -> None:
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.close()


_SERVER_PY = r"""
import hashlib, socket, sys
addr, port, to = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(to)
print("READY", flush=True)
c, peer = s.accept(); c.settimeout(to)
h = hashlib.sha256(); n = 0
buf = bytearray(1 << 20); mv = memoryview(buf)
while True:
    k = c.recv_into(buf)
    if not k:
        break
    h.update(mv[:k]); n += k
print(h.hexdigest(), n, peer[0], flush=True)
c.close()
"""

_CLIENT_PY = r"""
import hashlib, os, socket, sys, time
addr, port, nbytes, to = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rate = float(sys.argv[5]) * 1e6 / 8  # bytes/s, 0 = unpaced
t0 = time.monotonic()
s = socket.create_connection((addr, port), timeout=to)
h = hashlib.sha256(); left = nbytes; step = (64 << 10) if rate else (1 << 20)
while left:
    chunk = os.urandom(min(left, step))
    h.update(chunk); s.sendall(chunk); left -= len(chunk)
    if rate:
        ahead = t0 + (nbytes - left) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):   # the server closes once it has hashed everything
    pass
print(h.hexdigest(), nbytes, "%.3f" % (time.monotonic() - t0), flush=True)
"""


class TcpTransfer:
    """A running Lab.start_tcp_transfer(); wait() returns a TransferResult."""

    def __init__(
        self,
        lab: Lab,
        server_host: Host,
        client_host: Host,
        dst_addr: str,
        nbytes: int,
        timeout: float,
    ):
        self.lab, self.server_host, self.client_host = lab, server_host, client_host
        self.dst_addr, self.nbytes, self.timeout = dst_addr, nbytes, timeout
        self.server: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.client is not None and self.client.poll() is None

    def wait(self) -> TransferResult:
        assert self.client is not None and self.server is not None
        try:
            try:
                c_out, c_err = self.client.communicate(timeout=self.timeout + 5)
                s_out, s_err = self.server.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                raise NetlabError(
                    f"TCP transfer of {self.nbytes} B to {self.dst_addr} "
                    f"timed out\n{self.lab._daemon_logs()}"
                ) from None
            if self.client.returncode or self.server.returncode:
                raise NetlabError(
                    f"TCP transfer to {self.dst_addr} failed: client "
                    f"rc={self.client.returncode} {c_err.decode(errors='replace')}\n"
                    f"server rc={self.server.returncode} {s_err.decode(errors='replace')}\n"
                    f"{self.lab._daemon_logs()}"
                )
            c_sha, _, secs = c_out.decode().split()
            s_sha, s_n, s_peer = s_out.decode().split()
            self.lab.last_transfer = {
                "bytes_sent": self.nbytes,
                "bytes_received": int(s_n),
                "seconds": float(secs),
                "server_saw_peer": s_peer,
                "mbit_s": self.nbytes * 8 / 1e6 / max(float(secs), 1e-9),
            }
            return TransferResult(c_sha, s_sha)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        for p, h in ((self.client, self.client_host), (self.server, self.server_host)):
            if p is not None:
                _terminate(p, grace=2)
                with contextlib.suppress(ValueError):
                    h.procs.remove(p)


class Lab:
    """Two hosts `a` and `b` joined by a veth pair, plus WireGuard tunnel helpers.

    Underlay: a = 198.18.0.1/24, fd18::1/64; b = 198.18.0.2/24, fd18::2/64 (dev ul0).
    Overlay (on the tunnel iface): a = 10.99.0.1/24, fd99::1/64; b = .2 / ::2.
    """

    UNDERLAY4 = {"a": "198.18.0.1", "b": "198.18.0.2"}
    UNDERLAY6 = {"a": "fd18::1", "b": "fd18::2"}
    OVERLAY4 = {"a": "10.99.0.1", "b": "10.99.0.2"}
    OVERLAY6 = {"a": "fd99::1", "b": "fd99::2"}
    PORTS = {"a": 51820, "b": 51821}
    V4_PREFIX, V6_PREFIX = 24, 64

    def __init__(self, keep_dir: bool | None = None):
        self.keep_dir = (os.environ.get("WGX_NETLAB_KEEP") == "1") if keep_dir is None else keep_dir
        self.dir: Path | None = None
        self.hosts: dict[str, Host] = {}
        self.psk_file: Path | None = None
        self.tun: Tunnel | None = None
        self.last_transfer: dict[str, Any] = {}
        self._runwg = False
        self._closed = False

    # -- context manager
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def host(self, h: Host | str) -> Host:
        return self.hosts[_label(h)]

    def peer(self, h: Host | str) -> Host:
        return self.hosts["b" if _label(h) == "a" else "a"]

    def start(self) -> None:
        _live_labs.add(self)
        try:
            _acquire_run_wireguard()
            self._runwg = True
            self.dir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}-lab-"))
            for label in ("a", "b"):
                h = Host(label, self.dir)
                self.hosts[label] = h  # registered before create(): close() handles it
                h.create()
            # veth created directly inside the namespaces (never in the root netns)
            _run(
                [
                    "ip",
                    "-n",
                    self.a.name,
                    "link",
                    "add",
                    UNDERLAY_IF,
                    "numtxqueues", str(UNDERLAY_QUEUES), "numrxqueues", str(UNDERLAY_QUEUES),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    UNDERLAY_IF,
                    "numtxqueues", str(UNDERLAY_QUEUES), "numrxqueues", str(UNDERLAY_QUEUES),
                    "netns",
                    self.b.name,
                ]
            )
            for label, h in self.hosts.items():
                # veth starts with one active queue pair; the XDP tests want one per worker.
                h.run(["ethtool", "-L", UNDERLAY_IF, "rx", str(UNDERLAY_QUEUES),
                       "tx", str(UNDERLAY_QUEUES)])
                h.addr_add(UNDERLAY_IF, f"{self.UNDERLAY4[label]}/{self.V4_PREFIX}")
                h.addr_add(UNDERLAY_IF, f"{self.UNDERLAY6[label]}/{self.V6_PREFIX}")
                h.underlay = {"v4": self.UNDERLAY4[label], "v6": self.UNDERLAY6[label]}
                h.link_up(UNDERLAY_IF, mtu=1500)
                self._genkey(h)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Idempotent teardown: processes, namespaces, /run/wireguard (if ours), temp dir."""
        if self._closed:
            return
        self._closed = True
        errors = []
        try:
            for h in self.hosts.values():
                try:
                    h.close()
                except Exception as e:
                    errors.append(str(e))
        finally:
            if self._runwg:
                self._runwg = False
                _release_run_wireguard()
            if self.dir is not None:
                _keyguard_observe(self.dir)
            if self.dir is not None and not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            _live_labs.discard(self)
        if errors:
            raise NetlabError("; ".join(errors))

    # -- keys
    def _genkey(self, h: Host) -> None:
        assert self.dir is not None
        priv = _run(["wg", "genkey"]).stdout.strip()
        h.private_key_file = h.dir / "private.key"
        fd = os.open(h.private_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(priv + "\n")
        h.public_key = _run(["wg", "pubkey"], input=priv + "\n").stdout.strip()

    def _ensure_psk(self) -> Path:
        assert self.dir is not None
        if self.psk_file is None:
            psk = _run(["wg", "genpsk"]).stdout.strip()
            path = self.dir / "psk"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(psk + "\n")
            self.psk_file = path
        return self.psk_file

    # -- tunnel
    def tunnel(
        self,
        impl_a: Sequence[str],
        impl_b: Sequence[str],
        *,
        underlay: str = "v4",
        psk: bool = False,
        initiator: str = "a",
        iface: str = "wg0",
        mtu: int = 1420,
        env_a: Mapping[str, str] | None = None,
        env_b: Mapping[str, str] | None = None,
        establish: bool = False,
        persistent_keepalive: int | None = None,
    ) -> Tunnel:
        """Start an implementation on each host and configure a tunnel between them.

        Only the initiator gets the peer's endpoint, so only its traffic can start
        the handshake; the responder learns the initiator's endpoint by roaming.
        With establish=True, pings from the initiator until the handshake is done.
        """
        if underlay not in ("v4", "v6"):
            raise ValueError("underlay must be 'v4' or 'v6'")
        if initiator not in ("a", "b"):
            raise ValueError("initiator must be 'a' or 'b'")
        if self.tun is not None:
            raise NetlabError("this lab already has a tunnel")
        self.tun = Tunnel(
            iface=iface,
            underlay=underlay,
            psk=psk,
            initiator=initiator,
            impl_a=list(impl_a),
            impl_b=list(impl_b),
        )
        self.a.start_daemon(impl_a, iface, env=env_a)
        self.b.start_daemon(impl_b, iface, env=env_b)
        psk_file = self._ensure_psk() if psk else None
        for label, h in self.hosts.items():
            other = self.peer(h)
            port = self.PORTS[label]
            args = [
                "set",
                iface,
                "private-key",
                str(h.private_key_file),
                "listen-port",
                str(port),
                "peer",
                other.public_key,
            ]
            if psk_file is not None:
                args += ["preshared-key", str(psk_file)]
            if label == initiator:
                args += ["endpoint", self.endpoint_of(other, underlay, self.PORTS[other.label])]
            if persistent_keepalive:
                args += ["persistent-keepalive", str(persistent_keepalive)]
            args += [
                "allowed-ips",
                f"{self.OVERLAY4[other.label]}/32,{self.OVERLAY6[other.label]}/128",
            ]
            h.wg(*args)
            h.listen_port = port
            self.tun.ports[label] = port
            h.addr_add(iface, f"{self.OVERLAY4[label]}/24")
            h.addr_add(iface, f"{self.OVERLAY6[label]}/64")
            h.link_up(iface, mtu=mtu)
        if establish:
            init = self.hosts[initiator]
            self.ping(init, self.OVERLAY4[self.peer(init).label], count=1, attempts=10)
        return self.tun

    @staticmethod
    def endpoint_of(h: Host, underlay: str, port: int) -> str:
        addr = h.underlay[underlay]
        return f"[{addr}]:{port}" if underlay == "v6" else f"{addr}:{port}"

    def _iface(self, iface: str | None) -> str:
        if iface is not None:
            return iface
        if self.tun is None:
            raise NetlabError("no tunnel set up; pass iface")
        return self.tun.iface

    # -- observation
    def wg_show_dump(self, host: Host | str, iface: str | None = None) -> dict[str, Any]:
        return parse_wg_dump(self.host(host).wg("show", self._iface(iface), "dump"))

    def peer_stats(self, host: Host | str, iface: str | None = None) -> dict[str, Any]:
        """The dump entry of `host`'s only configured peer (the other host)."""
        h = self.host(host)
        peers = self.wg_show_dump(h, iface)["peers"]
        key = self.peer(h).public_key
        if key not in peers:
            raise NetlabError(f"{h}: peer {key} not in wg dump: {peers}")
        return peers[key]

    def wait_counters_stable(
        self, iface: str | None = None, settle: float = 0.3, timeout: float = 10.0
    ) -> tuple[dict, dict]:
        """Poll both peers' stats until rx/tx counters stop moving; returns (a, b)."""
        deadline = time.monotonic() + timeout
        prev = None
        while True:
            cur = (self.peer_stats("a", iface), self.peer_stats("b", iface))
            key = tuple((s["rx_bytes"], s["tx_bytes"]) for s in cur)
            if prev is not None and key == prev:
                return cur
            if time.monotonic() > deadline:
                raise NetlabError(f"wg counters still moving after {timeout}s: {key}")
            prev = key
            time.sleep(settle)

    def udp_counters(self, host: Host | str) -> dict[str, int]:
        """UDP MIB counters of `host`'s namespace, IPv4 and IPv6 summed.

        Keys: in_datagrams, no_ports, in_errors (includes rcvbuf_errors),
        rcvbuf_errors, out_datagrams.  Only the WireGuard daemons use UDP in a
        lab namespace, so deltas of these tell how many encrypted datagrams
        the kernel dropped before the daemon could read them.
        """
        h = self.host(host)
        out = {
            "in_datagrams": 0,
            "no_ports": 0,
            "in_errors": 0,
            "rcvbuf_errors": 0,
            "out_datagrams": 0,
        }
        lines = h.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
        v4: dict[str, int] = {}
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("Udp:") and values.startswith("Udp:"):
                v4 = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
        v6 = {}
        for ln in h.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
            k, _, v = ln.partition(" ")
            if k.startswith("Udp6"):
                v6[k[4:]] = int(v.strip())
        for key, mib in (
            ("in_datagrams", "InDatagrams"),
            ("no_ports", "NoPorts"),
            ("in_errors", "InErrors"),
            ("rcvbuf_errors", "RcvbufErrors"),
            ("out_datagrams", "OutDatagrams"),
        ):
            out[key] = v4.get(mib, 0) + v6.get(mib, 0)
        return out

    def udp_lost(self, host: Host | str) -> int:
        """Datagrams that reached `host`'s namespace but no socket (errors + no port)."""
        c = self.udp_counters(host)
        return c["in_errors"] + c["no_ports"]

    # -- traffic
    def ping(
        self,
        src: Host | str,
        dst_addr: str,
        count: int = 3,
        interval: float = 0.05,
        wait: float = 2.0,
        attempts: int = 1,
        check: bool = True,
        size: int | None = None,
    ) -> dict[str, Any]:
        """ping from `src` (`size`: ICMP payload bytes).

        Returns {"transmitted", "received", "rtt_avg_ms", "output"}.

        With check=True, raises NetlabError unless all `count` replies arrived in
        one of `attempts` tries.
        """
        h = self.host(src)
        res: dict[str, Any] = {}
        for _ in range(max(1, attempts)):
            cp = h.run(
                ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait),
                 *(["-s", str(size)] if size else []), dst_addr],
                check=False,
                timeout=count * (interval + wait) + 10,
            )
            m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
            rtt = re.search(r"= [\d.]+/([\d.]+)/", cp.stdout)
            res = {
                "transmitted": int(m.group(1)) if m else 0,
                "received": int(m.group(2)) if m else 0,
                "rtt_avg_ms": float(rtt.group(1)) if rtt else None,
                "output": cp.stdout + cp.stderr,
            }
            if res["received"] == count:
                return res
        if check:
            raise NetlabError(
                f"ping {dst_addr} from {h}: {res['received']}/{count} replies\n"
                f"{res['output']}\n{self._daemon_logs()}"
            )
        return res

    def start_tcp_transfer(
        self,
        src: Host | str,
        dst: Host | str,
        dst_addr: str,
        nbytes: int,
        port: int = 5999,
        timeout: float = 60.0,
        rate_mbit: float | None = None,
    ) -> TcpTransfer:
        """Start sending `nbytes` random bytes over TCP from `src` to `dst_addr`
        (served on `dst`); returns a handle whose wait() gives the two sha256s.

        rate_mbit paces the sender (to keep a transfer running while a test
        changes something underneath it).
        """
        s_host, c_host = self.host(dst), self.host(src)
        xfer = TcpTransfer(self, s_host, c_host, dst_addr, nbytes, timeout)
        try:
            xfer.server = s_host.popen(
                [sys.executable, "-c", _SERVER_PY, dst_addr, str(port), str(timeout)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            line = _readline_with_timeout(xfer.server, 10.0)
            if line.strip() != "READY":
                raise NetlabError(
                    f"transfer server on {s_host} did not start: {line!r} "
                    f"{_drain(xfer.server.stderr)}"
                )
            xfer.client = c_host.popen(
                [
                    sys.executable,
                    "-c",
                    _CLIENT_PY,
                    dst_addr,
                    str(port),
                    str(nbytes),
                    str(timeout),
                    str(rate_mbit or 0),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            xfer.cleanup()
            raise
        return xfer

    def tcp_transfer_sha256(
        self,
        src: Host | str,
        dst: Host | str,
        dst_addr: str,
        nbytes: int,
        port: int = 5999,
        timeout: float = 60.0,
    ) -> TransferResult:
        """Move `nbytes` random bytes over TCP from `src` to `dst_addr` (served on `dst`).

        Returns (sha256 of what the client sent, sha256 of what the server got).
        Byte counts, duration and rate are left in self.last_transfer.
        """
        return self.start_tcp_transfer(src, dst, dst_addr, nbytes, port, timeout).wait()

    # -- roaming
    def move_endpoint(
        self, host: Host | str, new_addr: str | None = None, new_port: int | None = None
    ) -> tuple[str, int]:
        """Change the underlay source address and/or UDP port of `host`'s daemon.

        A new address is added to ul0 before the old one of the same family is
        deleted (promote_secondaries is on), so the kernel picks the new source
        from then on; sticky-source implementations must notice that the old one
        is gone.  A new port is set with `wg set IFACE listen-port`, which makes
        the daemon rebind.  Returns the (address, port) the daemon now uses for
        the tunnel's underlay family.
        """
        h = self.host(host)
        fam = self.tun.underlay if self.tun else "v4"
        if new_addr is not None:
            fam = "v6" if ipaddress.ip_address(new_addr).version == 6 else "v4"
            prefix = self.V6_PREFIX if fam == "v6" else self.V4_PREFIX
            old = h.underlay[fam]
            h.addr_add(UNDERLAY_IF, f"{new_addr}/{prefix}")
            h.addr_del(UNDERLAY_IF, f"{old}/{prefix}")
            h.underlay[fam] = new_addr
        if new_port is not None:
            h.wg("set", self._iface(None), "listen-port", str(new_port))
            h.listen_port = new_port
        assert h.listen_port is not None
        return h.underlay[fam], h.listen_port

    # -- diagnostics
    def _daemon_logs(self) -> str:
        parts = []
        for h in self.hosts.values():
            if h.daemon_log is not None:
                parts.append(f"--- daemon log {h} ---\n{h.daemon_output()}")
        return "\n".join(parts)


def _keyguard_observe(directory: Path) -> None:
    """Hand the lab's key files and daemon logs to the keyguard plugin, if it is loaded."""
    keyguard = sys.modules.get("keyguard")
    if keyguard is not None:
        with contextlib.suppress(Exception):  # the check never breaks a teardown
            keyguard.observe_tree(directory)


def _readline_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    """Read one line from proc.stdout (a binary pipe) without blocking forever."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def _drain(f: Any) -> str:
    if f is None:
        return ""
    try:
        fd = f.fileno()
        r, _, _ = select.select([fd], [], [], 0.5)
        return os.read(fd, 65536).decode(errors="replace") if r else ""
    except OSError:
        return ""


def snapshot(netns: str) -> dict[str, Any]:
    """Links, addresses, routes (all tables) and rules of a namespace, comparable."""
    from wgx.control.netconf import NetConf

    with NetConf(netns) as nc:
        ipr = nc.ipr
        return {
            "links": sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links()),
            "addresses": sorted((m["index"], m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                                for m in ipr.get_addr()),
            "routes": sorted((f, m.get_attr("RTA_TABLE"), m.get_attr("RTA_DST") or "",
                              m["dst_len"], m.get_attr("RTA_OIF") or 0, m["type"])
                             for f in (2, 10) for m in ipr.get_routes(family=f)),
            "rules": {v: sorted(repr(sorted(r.items())) for r in nc.rules(v)) for v in (4, 6)},
        }
