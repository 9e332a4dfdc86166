"""The netns lab: hosts are network namespaces joined by multi-queue veth pairs.

    state = lab.up(LabSpec(hosts=2, queues=2))   # alpha <-> beta, tunnels up
    lab.exec_argv(state, "alpha", ["ping", "10.99.0.2"])
    lab.down("wgxlab")                            # everything gone, also after a crash

Topology. Two hosts (alpha, beta) are joined by one veth pair (`ul0` on both
ends, created directly inside the namespaces). More hosts hang off a bridge
in a namespace of their own (`NAME-sw`); the overlay is then a full mesh or a
hub (the first host) with spokes. Underlay 198.18.0.i/24 + fd18::i/64, overlay
10.99.0.i/24 + fd99::i/64, where i is the host's position (from 1). Nothing
is ever added to the root namespace.

Impaired underlay (`LabSpec.impair`, `wgx lab up --impair loss=5%,...`): then
every host, also with two, hangs off `NAME-sw`, where no bridge but one
process (wgx.lab.impair.Switch) forwards the frames between the ports and
drops, duplicates, delays and reorders them on the way; see wgx/lab/impair.py
for why it is built that way. `status` shows its settings and counters.

Each host is provisioned by scripts/provision-host.sh, the same step the
Vagrantfile runs on VMs: keys and a wg-quick config in the lab directory,
then `wgx up` (or wg-quick with wireguard-go). Every host gets a private
/run/wireguard (a bind mount in a private mount namespace), because the UAPI
socket path is global across network namespaces.

State. Everything the lab creates is recorded in /run/wgx-lab/NAME/state.json
*before* it is created, so `down` finds it after a crash or a SIGKILL.
Namespaces are only deleted, and processes only killed, when the namespace
still has the inode recorded at creation (a same-named namespace made by
someone else is never touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wgx.control.uapi_client import UapiClient, UapiClientError

from . import impair as impairmod
from .proc import (
    LabError,
    alive,
    kill_pids,
    ns_inode,
    pids_in_netns,
    proc_comm,
    proc_starttime,
    run,
    run_logged,
    wait_until,
)

STATE_ROOT = Path("/run/wgx-lab")
WGX_STATE_DIR = Path("/run/wgx")  # `wgx up` keeps its undo records there
RUN_WG = Path("/run/wireguard")
DEFAULT_NAME = "wgxlab"
UNDERLAY_IF = "ul0"
TUNNEL_IF = "wg0"
LISTEN_PORT = 51820
MAX_HOSTS = 24
GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
         "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau",
         "upsilon", "phi", "chi", "psi", "omega"]
IMPLS = ("wgx", "wireguard-go", "none")
DATAPLANES = ("auto", "xdp", "socket")
TOPOLOGIES = ("hub", "mesh")
# "Bind $0 over /run/wireguard and $1 over /run/wgx, then exec the command".
_HOST_SH = ('mount --bind "$0" /run/wireguard && mount --bind "$1" /run/wgx && shift && '
            'exec "$@"')
JUNK_SUBNET = "198.19.0"  # the junk namespace's link (still inside 198.18.0.0/15)

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


def provision_script() -> Path:
    """scripts/provision-host.sh of this checkout (or $WGX_PROVISION_SCRIPT)."""
    env = os.environ.get("WGX_PROVISION_SCRIPT")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "scripts" / \
        "provision-host.sh"
    if not path.is_file():
        raise LabError(f"provisioning script not found: {path} (set WGX_PROVISION_SCRIPT)")
    return path


def _tool_path() -> str:
    """PATH for lab commands: the running interpreter's bin dir first (wgx, wgx-userspace)."""
    import sys

    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return f"{bindir}{os.pathsep}{path}"


# ----------------------------------------------------------------------- spec/state


@dataclass
class LabSpec:
    name: str = DEFAULT_NAME
    hosts: int = 2
    queues: int = 2
    dataplane: str = "auto"
    peer_impl: str = "wgx"  # wgx, or wireguard-go for the last host
    topology: str = "mesh"
    impls: list[str] | None = None  # one per host; overrides peer_impl
    env: dict[str, str] = field(default_factory=dict)  # extra daemon environment
    junk: bool = False  # a junk-sender namespace that reaches the last host's underlay
    check: bool = True  # ping every host's overlay from the first host after up
    workers: int | None = None  # WGX_WORKERS (default: queues)
    impair: str | None = None  # impairment of the underlay (wgx.lab.impair.parse)

    def validate(self) -> None:
        if not (2 <= self.hosts <= MAX_HOSTS):
            raise LabError(f"--hosts {self.hosts}: use 2 to {MAX_HOSTS}")
        if not (1 <= self.queues <= 64):
            raise LabError(f"--queues {self.queues}: use 1 to 64")
        if self.dataplane not in DATAPLANES:
            raise LabError(f"--dataplane {self.dataplane!r}: use {', '.join(DATAPLANES)}")
        if self.peer_impl not in ("wgx", "wireguard-go"):
            raise LabError(f"--peer-impl {self.peer_impl!r}: use wgx or wireguard-go")
        if self.topology not in TOPOLOGIES:
            raise LabError(f"--topology {self.topology!r}: use hub or mesh")
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name) \
                or len(self.name) > 24:
            raise LabError(f"lab name {self.name!r}: letters, digits, - and _, at most 24")
        if self.impair is not None:
            try:
                impairmod.parse(self.impair)
            except impairmod.ImpairError as e:
                raise LabError(f"--impair {e}") from None
        if self.impls is not None and (
                len(self.impls) != self.hosts or any(i not in IMPLS for i in self.impls)):
            raise LabError(f"impls {self.impls}: one of {IMPLS} per host")

    def host_impls(self) -> list[str]:
        if self.impls is not None:
            return list(self.impls)
        impls = ["wgx"] * self.hosts
        if self.peer_impl == "wireguard-go":
            impls[-1] = "wireguard-go"
        return impls


@dataclass
class HostState:
    name: str
    index: int
    ns: str
    impl: str
    dir: str
    uapi_dir: str
    conf: str
    state_dir: str = ""
    inode: int | None = None
    iface: str = TUNNEL_IF
    underlay4: str = ""
    underlay6: str = ""
    overlay4: str = ""
    overlay6: str = ""
    up: bool = False


@dataclass
class LabState:
    name: str
    dir: str
    spec: dict[str, Any]
    owner: str  # "<pid> <starttime>" of the process that ran `up`
    created: float
    hosts: list[HostState] = field(default_factory=list)
    extra_ns: dict[str, int | None] = field(default_factory=dict)  # switch, junk
    created_run_wireguard: bool = False
    complete: bool = False
    junk: dict[str, Any] | None = None
    impair: dict[str, Any] | None = None  # settings, pid/starttime and stats file of the stage

    @property
    def path(self) -> Path:
        return Path(self.dir) / "state.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, name: str) -> LabState:
        path = STATE_ROOT / name / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab {name!r} (no {path})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"cannot read {path}: {e}") from None
        try:  # tolerate records of another wgx version: unknown keys are ignored
            hosts = [HostState(**_known(HostState, h)) for h in data.pop("hosts", [])]
            return cls(hosts=hosts, **_known(cls, data))
        except TypeError as e:
            raise LabError(f"cannot read {path}: {e}") from None

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name or h.ns == name:
                return h
        raise LabError(f"lab {self.name}: no host {name!r} "
                       f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def namespaces(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {h.ns: h.inode for h in self.hosts}
        out.update(self.extra_ns)
        return out

    def inodes(self) -> list[int]:
        return [i for i in self.namespaces().values() if i is not None]

    def owner_alive(self) -> bool:
        pid_s, start = self.owner.split()
        return alive(int(pid_s)) and proc_starttime(int(pid_s)) == start


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def list_labs() -> list[str]:
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if (p / "state.json").is_file())


def host_names(n: int) -> list[str]:
    return [GREEK[i] if i < len(GREEK) else f"h{i + 1}" for i in range(n)]


# -------------------------------------------------------------------- running things


def ns_argv(host: HostState, cmd: Sequence[str]) -> list[str]:
    """argv that runs `cmd` as `host`: in its netns (and its /sys), with its private
    /run/wireguard (UAPI sockets) and /run/wgx (`wgx up` records)."""
    return ["ip", "netns", "exec", host.ns, "unshare", "-m", "sh", "-c", _HOST_SH,
            host.uapi_dir, host.state_dir, *cmd]


def exec_argv(state: LabState, host: str, cmd: Sequence[str]) -> list[str]:
    h = state.host(host)
    if h.inode is None or ns_inode(h.ns) != h.inode:
        raise LabError(f"host {host}: namespace {h.ns} is gone (lab {state.name} is down?)")
    _ensure_run_wireguard()
    return ns_argv(h, cmd)


def host_run(host: HostState, cmd: Sequence[str], **kw: Any):
    _ensure_run_wireguard()
    return run(ns_argv(host, cmd), **kw)


def _ensure_run_wireguard() -> bool:
    """The bind-mount targets must exist; True if this call created /run/wireguard.

    /run/wgx is wgx's own directory: made if missing, never removed (removing a
    directory that is a mount point elsewhere would detach other labs' mounts).
    """
    WGX_STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    if RUN_WG.is_dir():
        return False
    try:
        RUN_WG.mkdir(mode=0o755)
    except FileExistsError:
        return False
    return True


def _run_wireguard_mounted_anywhere() -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/mountinfo") as f:
                for line in f:
                    if line.split(" ", 5)[4] in ("/run/wireguard", "/var/run/wireguard"):
                        return True
        except (OSError, IndexError):
            continue
    return False


# -------------------------------------------------------------------------------- up


def up(spec: LabSpec, log: Log = _nolog) -> LabState:
    """Build the lab; on any failure everything built so far is removed again."""
    spec.validate()
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces)")
    for tool in ("ip", "unshare", "ping"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` not found in PATH")
    impls = spec.host_impls()
    if "wireguard-go" in impls:
        for tool in ("wireguard-go", "wg-quick", "wg"):
            if shutil.which(tool) is None:
                raise LabError(f"`{tool}` not found in PATH (needed for wireguard-go hosts)")
    script = provision_script()
    lab_dir = STATE_ROOT / spec.name
    if (lab_dir / "state.json").exists():
        old = LabState.load(spec.name)
        hint = "still running" if old.owner_alive() else "left over from a crash"
        raise LabError(f"lab {spec.name!r} exists ({hint}): run `wgx lab down"
                       f"{'' if spec.name == DEFAULT_NAME else ' --name ' + spec.name}` first")
    names = host_names(spec.hosts)
    taken = [n for n in [f"{spec.name}-{h}" for h in names] + [f"{spec.name}-sw",
             f"{spec.name}-junk"] if ns_inode(n) is not None]
    if taken:
        raise LabError(f"network namespace(s) {', '.join(taken)} exist and are not this "
                       f"lab's: pick another --name")
    STATE_ROOT.mkdir(mode=0o755, exist_ok=True)
    lab_dir.mkdir(mode=0o700, exist_ok=True)
    state = LabState(name=spec.name, dir=str(lab_dir), spec=asdict(spec),
                     owner=f"{os.getpid()} {proc_starttime(os.getpid())}", created=time.time())
    for i, (hname, impl) in enumerate(zip(names, impls, strict=True), start=1):
        hdir = lab_dir / hname
        state.hosts.append(HostState(
            name=hname, index=i, ns=f"{spec.name}-{hname}", impl=impl, dir=str(hdir),
            uapi_dir=str(hdir / "uapi"), state_dir=str(hdir / "wgx-state"),
            conf=str(hdir / f"{TUNNEL_IF}.conf"),
            underlay4=f"198.18.0.{i}", underlay6=f"fd18::{i}",
            overlay4=f"10.99.0.{i}", overlay6=f"fd99::{i}"))
    state.save()
    try:
        state.created_run_wireguard = _ensure_run_wireguard()
        state.save()
        _build_underlay(state, spec, log)
        if spec.impair is not None:
            if spec.junk:  # its port must exist before the stage starts
                _build_junk(state, spec, log)
            _start_impair(state, spec, log)
        for h in state.hosts:
            _provision(state, spec, h, script, log)
        if spec.junk and state.junk is None:
            _build_junk(state, spec, log)
        state.complete = True
        state.save()
        if spec.check:
            check(state, log)
    except BaseException as e:
        log(f"lab up failed, removing it again: {str(e).splitlines()[0] if str(e) else e!r}")
        with contextlib.suppress(Exception):
            down(spec.name, log=log, graceful=False)
        raise
    return state


def _add_ns(state: LabState, ns: str, extra: bool, host: HostState | None = None) -> None:
    if extra:
        state.extra_ns[ns] = None
    state.save()  # the intent first: a crash right after `ip netns add` is still found
    run(["ip", "netns", "add", ns])
    ino = ns_inode(ns)
    if extra:
        state.extra_ns[ns] = ino
    elif host is not None:
        host.inode = ino
    state.save()
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def _veth(ns_a: str, name_a: str, ns_b: str, name_b: str, queues: int) -> None:
    q = ["numtxqueues", str(queues), "numrxqueues", str(queues)]
    run(["ip", "-n", ns_a, "link", "add", name_a, *q, "type", "veth", "peer", "name", name_b,
         "netns", ns_b, *q])


def _channels(ns: str, dev: str, queues: int, log: Log) -> None:
    if queues <= 1 or shutil.which("ethtool") is None:
        return
    cp = run(["ip", "netns", "exec", ns, "ethtool", "-L", dev, "rx", str(queues), "tx",
              str(queues)], check=False)
    if cp.returncode:
        log(f"ethtool -L {dev} rx {queues} tx {queues} in {ns}: {cp.stderr.strip()}")


def _build_underlay(state: LabState, spec: LabSpec, log: Log) -> None:
    for h in state.hosts:
        log(f"namespace {h.ns}")
        _add_ns(state, h.ns, extra=False, host=h)
    if spec.impair is not None:
        sw = f"{spec.name}-sw"
        log(f"namespace {sw} with the impairment stage")
        _add_ns(state, sw, extra=True)
        for h in state.hosts:
            port = _port_name(h.name)
            _veth(h.ns, UNDERLAY_IF, sw, port, spec.queues)
            run(["ip", "-n", sw, "link", "set", port, "up"])
    elif spec.hosts == 2:
        a, b = state.hosts
        log(f"veth {a.name}:{UNDERLAY_IF} <-> {b.name}:{UNDERLAY_IF} ({spec.queues} queues)")
        _veth(a.ns, UNDERLAY_IF, b.ns, UNDERLAY_IF, spec.queues)
    else:
        sw = f"{spec.name}-sw"
        log(f"namespace {sw} with bridge br0")
        _add_ns(state, sw, extra=True)
        run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for h in state.hosts:
            port = _port_name(h.name)
            _veth(h.ns, UNDERLAY_IF, sw, port, spec.queues)
            run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
    for h in state.hosts:
        _channels(h.ns, UNDERLAY_IF, spec.queues, log)
        if spec.impair is not None:
            _no_segmentation(h.ns, UNDERLAY_IF)
        run(["ip", "-n", h.ns, "addr", "add", f"{h.underlay4}/24", "dev", UNDERLAY_IF])
        run(["ip", "-n", h.ns, "addr", "add", f"{h.underlay6}/64", "dev", UNDERLAY_IF, "nodad"])
        run(["ip", "-n", h.ns, "link", "set", UNDERLAY_IF, "mtu", "1500", "up"])


def _build_junk(state: LabState, spec: LabSpec, log: Log) -> None:
    """A namespace that can send datagrams to the last host's underlay address.

    Two hosts: it hangs off the first host, which forwards (so the junk enters
    the target through its `ul0`, where XDP sits). More hosts: it joins the bridge.
    """
    junk = f"{spec.name}-junk"
    log(f"namespace {junk} (junk sender)")
    _add_ns(state, junk, extra=True)
    target = state.hosts[-1]
    if spec.hosts == 2:
        first = state.hosts[0]
        _veth(first.ns, "ulj", junk, "junk0", 1)
        run(["ip", "-n", first.ns, "addr", "add", f"{JUNK_SUBNET}.1/24", "dev", "ulj"])
        run(["ip", "-n", first.ns, "link", "set", "ulj", "up"])
        run(["ip", "netns", "exec", first.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        run(["ip", "-n", junk, "addr", "add", f"{JUNK_SUBNET}.2/24", "dev", "junk0"])
        run(["ip", "-n", junk, "link", "set", "junk0", "up"])
        run(["ip", "-n", junk, "route", "add", "198.18.0.0/24", "via", f"{JUNK_SUBNET}.1"])
        run(["ip", "-n", target.ns, "route", "add", f"{JUNK_SUBNET}.0/24", "via",
             first.underlay4, "dev", UNDERLAY_IF])
        src = f"{JUNK_SUBNET}.2"
    else:
        sw = f"{spec.name}-sw"
        _veth(junk, "junk0", sw, "p-junk", 1)
        if spec.impair is not None:
            run(["ip", "-n", sw, "link", "set", "p-junk", "up"])
            _no_segmentation(junk, "junk0")
        else:
            run(["ip", "-n", sw, "link", "set", "p-junk", "master", "br0", "up"])
        src = "198.18.0.250"
        run(["ip", "-n", junk, "addr", "add", f"{src}/24", "dev", "junk0"])
        run(["ip", "-n", junk, "link", "set", "junk0", "up"])
    state.junk = {"ns": junk, "src": src, "target": target.underlay4, "port": LISTEN_PORT}
    state.save()


def _port_name(host: str) -> str:
    return f"p-{host}"[:15]


def _no_segmentation(ns: str, dev: str) -> None:
    """Segment before the wire, so the impairment stage sees every datagram on its own."""
    run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
         "tx-udp-segmentation", "off"])


def _start_impair(state: LabState, spec: LabSpec, log: Log) -> None:
    """Start the impairment stage in NAME-sw and wait until its sockets are bound."""
    settings = impairmod.parse(spec.impair or "").with_seed()
    sw = f"{spec.name}-sw"
    ports = {_port_name(h.name): h.name for h in state.hosts}
    if state.junk is not None and spec.hosts > 2:
        ports["p-junk"] = "junk"
    stats = Path(state.dir) / "impair.json"
    logfile = Path(state.dir) / "impair.log"
    env = environment()
    root = str(Path(impairmod.__file__).resolve().parents[2])  # this wgx, also for -m
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = ["ip", "netns", "exec", sw, sys.executable, "-m", "wgx.lab.impair",
            "--ports", ",".join(ports), "--spec", settings.canonical(), "--stats", str(stats)]
    log(f"impairment stage in {sw}: {settings.canonical()}")
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    # `ip netns exec` execs the command: proc.pid is the stage itself
    state.impair = {"settings": settings.canonical(), "spec": settings.to_dict(),
                    "pid": proc.pid, "starttime": None, "stats": str(stats),
                    "log": str(logfile), "ports": ports}
    state.save()

    def ready() -> bool:
        if proc.poll() is not None:
            raise LabError(f"the impairment stage exited (rc={proc.returncode}):\n"
                           + logfile.read_text(errors="replace")[-2000:])
        try:
            return bool(json.loads(stats.read_text()).get("ready"))
        except (OSError, ValueError):
            return False

    wait_until(ready, timeout=15, what="the impairment stage")
    state.impair["starttime"] = proc_starttime(proc.pid)
    state.save()


def impair_status(state: LabState) -> dict[str, Any] | None:
    """Settings, liveness and counters of the impairment stage (None: not impaired).

    `observed` gives the rates the stage really applied, per sending host:
    loss = dropped / rx, dup = duplicated / (rx - dropped - overflow),
    reorder = reordered / packets sent, held = held / copies.
    """
    if state.impair is None:
        return None
    info = dict(state.impair)
    pid, start = info.get("pid"), info.get("starttime")
    info["running"] = bool(pid and alive(pid) and proc_starttime(pid) == start)
    try:
        data = json.loads(Path(info["stats"]).read_text())
    except (OSError, ValueError, KeyError):
        data = {}
    info["updated"] = data.get("updated")
    info["queued"] = data.get("queued")
    counters: dict[str, dict[str, int]] = {}
    observed: dict[str, dict[str, float]] = {}
    for port, c in data.get("ports", {}).items():
        who = info["ports"].get(port, port)
        counters[who] = c
        admitted = c["rx"] - c["dropped"] - c["overflow"]
        copies = admitted + c["duplicated"]
        firsts = c["tx"] - c["duplicated"]
        observed[who] = {
            "loss": c["dropped"] / c["rx"] if c["rx"] else 0.0,
            "dup": c["duplicated"] / admitted if admitted else 0.0,
            "held": c["held"] / copies if copies else 0.0,
            "reorder": c["reordered"] / firsts if firsts > 0 else 0.0,
        }
    info["counters"] = counters
    info["observed"] = observed
    return info


def _daemon_env(spec: LabSpec, host: HostState) -> dict[str, str]:
    env = dict(os.environ, PATH=_tool_path())
    if host.impl == "wgx" and spec.dataplane != "socket":
        env.setdefault("WGX_XDP_IFACE", UNDERLAY_IF)
        env.setdefault("WGX_WORKERS", str(spec.workers or spec.queues))
    env.update(spec.env)
    return env


def _provision(state: LabState, spec: LabSpec, h: HostState, script: Path, log: Log) -> None:
    log(f"provision {h.name}: {h.impl}" + (f" ({spec.dataplane})" if h.impl == "wgx" else ""))
    Path(h.dir).mkdir(mode=0o700, exist_ok=True)
    Path(h.uapi_dir).mkdir(mode=0o755, exist_ok=True)
    os.chmod(h.uapi_dir, 0o755)
    Path(h.state_dir).mkdir(mode=0o700, exist_ok=True)
    _ensure_run_wireguard()
    argv = ["bash", str(script), h.name, "--lab-dir", state.dir,
            "--hosts", " ".join(x.name for x in state.hosts), "--topology", spec.topology,
            "--impl", h.impl, "--dataplane", spec.dataplane, "--netns", h.ns,
            "--uapi-dir", h.uapi_dir, "--state-dir", h.state_dir, "--iface", h.iface,
            "--port", str(LISTEN_PORT)]
    h.up = h.impl != "none"  # recorded before: a half-done `up` is taken down too
    state.save()
    run_logged(argv, Path(h.dir) / "provision.log", env=_daemon_env(spec, h), timeout=120)


def _ping_ok(src: HostState, dst: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cp = host_run(src, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst], check=False,
                      timeout=10)
        if cp.returncode == 0:
            return True
    return False


def check(state: LabState, log: Log = _nolog, timeout: float = 15.0) -> None:
    """Ping every other host's overlay (IPv4) from the first host; LabError if one fails."""
    first = state.hosts[0]
    tunnel = any(h.impl != "none" for h in state.hosts)
    for h in state.hosts[1:]:
        dst = h.overlay4 if tunnel else h.underlay4
        if not _ping_ok(first, dst, timeout):
            raise LabError(f"lab {state.name}: {first.name} cannot ping {h.name} ({dst})"
                           + "".join(_daemon_log_tail(x) for x in (first, h)))
        log(f"{first.name} -> {h.name} ({dst}): ok")


def _daemon_log_tail(h: HostState, lines: int = 12) -> str:
    """The last lines of a wgx host's daemon log (see interface.daemon_log_path), if any."""
    if h.impl != "wgx" or not h.state_dir:
        return ""
    path = Path(h.state_dir) / f"{h.iface}.log"
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    if not tail:
        return f"\n{h.name}: daemon log {path} is empty"
    return f"\n{h.name}: last lines of the daemon log {path}:\n" + "\n".join(
        f"  {line}" for line in tail)


# ------------------------------------------------------------------------------ down


def _ours(ns: str, inode: int | None) -> bool:
    cur = ns_inode(ns)
    if cur is None:
        return False
    if inode is not None:
        return cur == inode
    # recorded as intended but the inode never made it into the state file: only an
    # empty namespace (nothing runs in it) of that exact name is taken as ours
    return not pids_in_netns([cur])


def down(name: str = DEFAULT_NAME, log: Log = _nolog, graceful: bool = True) -> list[str]:
    """Remove the lab: tunnels, processes, namespaces, files. Returns what was removed.

    Works from the state file alone, so also after a crash or a killed `wgx lab up`.
    `graceful` first runs `wgx down` / `wg-quick down` on every host; whatever is
    left (or everything, without it) is killed with the namespaces.
    """
    state = LabState.load(name)
    removed: list[str] = []
    namespaces = {ns: ino for ns, ino in state.namespaces().items() if _ours(ns, ino)}
    if graceful:
        script = None
        with contextlib.suppress(LabError):
            script = provision_script()
        for h in reversed(state.hosts):
            if not (h.up and h.ns in namespaces and script and Path(h.conf).exists()):
                continue
            argv = ["bash", str(script), h.name, "--lab-dir", state.dir, "--hosts",
                    " ".join(x.name for x in state.hosts), "--impl", h.impl, "--netns", h.ns,
                    "--uapi-dir", h.uapi_dir, "--state-dir", h.state_dir, "--iface", h.iface,
                    "--action", "down"]
            _ensure_run_wireguard()
            try:
                run_logged(argv, Path(h.dir) / "provision.log",
                           env=dict(os.environ, PATH=_tool_path()), timeout=30)
                log(f"{h.name}: tunnel down")
            except LabError as e:
                log(f"{h.name}: graceful down failed ({str(e).splitlines()[0]}); forcing")
    inodes = [ino for ns in namespaces if (ino := ns_inode(ns)) is not None]
    pids = [p for p in pids_in_netns(inodes) if alive(p)]
    if pids:
        log(f"stopping {len(pids)} process(es): "
            + ", ".join(f"{p} ({proc_comm(p)})" for p in pids))
        kill_pids(pids)
    for ns in namespaces:
        cp = run(["ip", "netns", "del", ns], check=False)
        if cp.returncode == 0:
            removed.append(ns)
            log(f"deleted namespace {ns}")
        else:
            log(f"cannot delete namespace {ns}: {cp.stderr.strip()}")
    # wgx's undo records were in the hosts' private /run/wgx, inside the lab directory
    lab_dir = Path(state.dir)
    if lab_dir.parent == STATE_ROOT and lab_dir.name == name:
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(str(lab_dir))
    if state.created_run_wireguard and not list_labs() and not _run_wireguard_mounted_anywhere():
        with contextlib.suppress(OSError):
            RUN_WG.rmdir()  # only if empty: someone else may have a socket there
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()
    return removed


# ---------------------------------------------------------------------------- status


def dataplane_pids(host: HostState) -> dict[str, list[int]]:
    """The host's dataplane processes: {"daemon": [...], "workers": [...]}."""
    out: dict[str, list[int]] = {"daemon": [], "workers": []}
    if host.impl == "wgx":
        try:
            st = UapiClient(host.iface, host.uapi_dir).stats()
        except UapiClientError:
            return out
        if st.get("pid", "").isdigit():
            out["daemon"] = [int(st["pid"])]
        out["workers"] = [int(p) for p in st.get("worker_pids", "").split(",") if p.isdigit()]
    elif host.impl == "wireguard-go" and host.inode is not None:
        out["daemon"] = [p for p in pids_in_netns([host.inode])
                         if (proc_comm(p) or "").startswith("wireguard-go")]
    return out


def host_status(host: HostState) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": host.name, "netns": host.ns, "impl": host.impl, "iface": host.iface,
        "underlay": [host.underlay4, host.underlay6],
        "overlay": [host.overlay4, host.overlay6] if host.impl != "none" else [],
        "netns_ok": host.inode is not None and ns_inode(host.ns) == host.inode,
        "dataplane": None, "pids": {}, "peers": [],
    }
    if not info["netns_ok"] or host.impl == "none":
        return info
    client = UapiClient(host.iface, host.uapi_dir)
    if host.impl == "wgx":
        with contextlib.suppress(UapiClientError):
            st = client.stats()
            info["dataplane"] = st.get("dataplane")
            if st.get("fastpath_error"):
                info["fastpath_error"] = st["fastpath_error"]
    else:
        info["dataplane"] = "wireguard-go"
    info["pids"] = dataplane_pids(host)
    try:
        dev = client.get()
    except UapiClientError as e:
        info["error"] = str(e)
        return info
    import base64

    for p in dev.peers:
        info["peers"].append({
            "public_key": base64.b64encode(p.public_key).decode(),
            "endpoint": f"{p.endpoint[0]}:{p.endpoint[1]}" if p.endpoint else None,
            "allowed_ips": p.allowed_ips,
            "latest_handshake": p.last_handshake or None,
            "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
        })
    return info


def status(name: str = DEFAULT_NAME) -> dict[str, Any]:
    state = LabState.load(name)
    return {
        "name": state.name, "dir": state.dir, "complete": state.complete,
        "owner_alive": state.owner_alive(), "spec": state.spec,
        "namespaces": {ns: _ours(ns, ino) for ns, ino in state.namespaces().items()},
        "junk": state.junk,
        "impair": impair_status(state),
        "hosts": [host_status(h) for h in state.hosts],
    }


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    return dict(env or os.environ, PATH=_tool_path())
