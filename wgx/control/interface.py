"""The provisioning API: bring a wg-quick style config up and down.

    iface = Interface.from_config("/etc/wireguard/wg0.conf")
    iface.up()            # daemon, keys, peers, addresses, MTU, routes, rules, hooks
    iface.peers           # live peer state from the daemon
    iface.down()          # undoes exactly what up() did

`up()` records every change it makes in a state file
(/run/wgx/IFACE.json, or per namespace /run/wgx/NETNS/IFACE.json) as it
goes; `down()` and a failed `up()` undo those records in reverse order, so a
failure halfway leaves nothing behind. Routes and addresses go with the
link; policy rules, sysctls and DNS are undone one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as cfg
from .netconf import NetConf, NetConfError, write_sysctl
from .uapi import SOCKET_DIR
from .uapi_client import DeviceState, PeerState, UapiClient, UapiClientError

STATE_DIR = Path("/run/wgx")
DEFAULT_TABLE = 51820
RULE_PRIORITY_SUPPRESS = 32764
RULE_PRIORITY_FWMARK = 32765
MTU_OVERHEAD = 80  # wg-quick: IPv6 (40) + UDP (8) + WireGuard (32)
DAEMON_START_TIMEOUT = 10.0


class InterfaceError(RuntimeError):
    """`up`/`down` failed; the message says which step and why."""


@dataclass
class UpState:
    """What `up()` changed, in order, so that `down()` can undo exactly that."""

    iface: str
    netns: str | None
    config_path: str
    created_link: bool = False
    daemon_pid: int | None = None
    table: int | None = None
    fwmark: int | None = None
    rules: list[dict[str, int]] = field(default_factory=list)
    sysctls: list[tuple[str, str]] = field(default_factory=list)  # (key, old value)
    dns: bool = False
    dataplane: str = "auto"


def _state_path(iface: str, netns: str | None) -> Path:
    return STATE_DIR / (f"{netns}/" if netns else "") / f"{iface}.json"


def daemon_log_path(iface: str, netns: str | None = None) -> Path:
    """Where the daemon that `up` starts logs (unless WGX_LOG_FILE says otherwise):
    beside the state file, renewed by every `up`; `down` removes it unless something
    was logged (at the default LOG_LEVEL, errors), which stays for a post-mortem."""
    return _state_path(iface, netns).with_suffix(".log")


def _resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise InterfaceError(f"cannot resolve endpoint {host}: {e.strerror}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # prefer IPv4, like wg
    addr = infos[0][4]
    return addr[0], addr[1]


def _daemon_command() -> list[str]:
    exe = shutil.which("wgx-userspace")
    if exe is None:
        candidate = Path(sys.executable).with_name("wgx-userspace")
        exe = str(candidate) if candidate.exists() else None
    if exe is None:
        raise InterfaceError("wgx-userspace not found in PATH")
    return [exe]


class Interface:
    """One WireGuard interface described by a wg-quick config file."""

    def __init__(self, config: cfg.Config, *, netns: str | None = None,
                 dataplane: str = "auto", uapi_dir: str = SOCKET_DIR,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.name = cfg.interface_name(config.path)
        self.netns = netns
        self.dataplane = dataplane
        self.uapi = UapiClient(self.name, uapi_dir)
        self.log = log or (lambda _msg: None)

    @classmethod
    def from_config(cls, path_or_name: str | os.PathLike[str], **kw: Any) -> Interface:
        """Load IFACE (= /etc/wireguard/IFACE.conf) or a path; raises config.ConfigError."""
        return cls(cfg.load(cfg.resolve(str(path_or_name))), **kw)

    # ------------------------------------------------------------------ queries

    @property
    def state_file(self) -> Path:
        return _state_path(self.name, self.netns)

    def is_up(self) -> bool:
        with NetConf(self.netns) as nc:
            return nc.link_index(self.name) is not None and self.uapi.exists()

    @property
    def peers(self) -> list[PeerState]:
        return self.uapi.get().peers

    def device_state(self) -> DeviceState:
        return self.uapi.get()

    # ----------------------------------------------------------------------- up

    def up(self) -> None:
        """Create and configure the interface; on failure undo everything and raise.

        A state file left by an earlier `up` whose daemon is dead (SIGKILL, OOM,
        crash) is undone first and reported through `log`; if that daemon still
        runs, the interface is up and this raises.
        """
        cfg.validate_for_up(self.config)
        self._clear_stale_state()
        with NetConf(self.netns) as nc:
            if nc.link_index(self.name) is not None:
                raise InterfaceError(f"{self.name} already exists")
        state = UpState(self.name, self.netns, str(self.config.path), dataplane=self.dataplane)
        try:
            self._up(state)
        except BaseException as e:
            self.log(f"up failed, rolling back: {e}")
            with contextlib.suppress(Exception):
                self._undo(state)
            if isinstance(e, (InterfaceError, NetConfError, UapiClientError,
                              subprocess.SubprocessError)):
                raise InterfaceError(f"{self.name}: {e}") from None
            raise

    def _load_state(self) -> UpState | None:
        try:
            data = json.loads(self.state_file.read_text())
            state = UpState(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise InterfaceError(f"unreadable state file {self.state_file}: {e}; check it and "
                                 "remove it by hand") from None
        state.sysctls = [tuple(s) for s in state.sysctls]  # type: ignore[misc]
        return state

    def _clear_stale_state(self) -> None:
        """Undo what a previous `up` recorded if its daemon died without `down`.

        Automatic rather than an error, because nothing of it can still be in use:
        the link (and with it addresses and routes) went with the daemon, and what
        outlives it -- policy rules, sysctls, DNS, the state file -- belongs to this
        interface name only.  The XDP program a dead daemon leaves on the underlay
        is removed by the next daemon when it attaches (xdp.cleanup_stale).
        """
        state = self._load_state()
        if state is None:
            return
        if state.daemon_pid and _daemon_alive(state.daemon_pid, self.name):
            raise InterfaceError(f"{self.name} is already up (daemon pid {state.daemon_pid})")
        self.log(f"{self.name}: daemon pid {state.daemon_pid} of an earlier `up` is gone; "
                 f"removing what it left (rules {len(state.rules)}, sysctls "
                 f"{len(state.sysctls)}, dns {'yes' if state.dns else 'no'}, state file)")
        self._undo(state)

    def _save_state(self, state: UpState) -> None:
        path = self.state_file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(json.dumps(state.__dict__))

    def _hooks(self, stage: str) -> None:
        for cmd in cfg.hooks(self.config, stage, self.name):
            self.log(f"[{stage}] {cmd}")
            argv = ["ip", "netns", "exec", self.netns, "bash", "-c", cmd] if self.netns \
                else ["bash", "-c", cmd]
            cp = subprocess.run(argv, timeout=60)
            if cp.returncode:
                raise InterfaceError(f"{stage} hook failed ({cp.returncode}): {cmd}")

    def _up(self, state: UpState) -> None:
        ic = self.config.interface
        self._hooks("PreUp")
        self._start_daemon(state)
        self._save_state(state)
        self.uapi.set(self._uapi_config(state))
        with NetConf(self.netns) as nc:
            for addr in ic.addresses:
                nc.add_address(self.name, addr)
            mtu = ic.mtu or self._auto_mtu(nc)
            nc.set_link(self.name, mtu=mtu, up=True)
            self._routes(nc, state)
        self._save_state(state)
        self._dns(state)
        self._hooks("PostUp")
        self._save_state(state)

    def _underlay(self) -> str | None:
        """The interface toward the first peer endpoint: where XDP attaches."""
        with NetConf(self.netns) as nc:
            for p in self.config.peers:
                if p.endpoint is not None:
                    host, _ = _resolve_endpoint(*p.endpoint)
                    return nc.route_device(host)
        return None

    def _start_daemon(self, state: UpState) -> None:
        env = dict(os.environ, WGX_DATAPLANE=self.dataplane)
        if self.dataplane != "socket" and not env.get("WGX_XDP_IFACE"):
            underlay = self._underlay()
            if underlay is not None:
                env["WGX_XDP_IFACE"] = underlay
            elif self.dataplane == "xdp":
                raise InterfaceError("--dataplane xdp needs a peer Endpoint to find the underlay "
                                     "interface (or set WGX_XDP_IFACE)")
        if not env.get("WGX_LOG_FILE"):
            log_file = daemon_log_path(self.name, self.netns)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.unlink(missing_ok=True)
            env["WGX_LOG_FILE"] = str(log_file)
        argv = _daemon_command() + [self.name]
        preexec = None
        if self.netns:
            netns = self.netns

            def preexec() -> None:  # runs in the child: join the namespace before exec
                from pyroute2.netns import setns

                setns(netns)

        cp = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                            preexec_fn=preexec)
        if cp.returncode:
            raise InterfaceError(f"daemon did not start: {cp.stderr.strip() or cp.returncode}")
        state.created_link = True
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not self.uapi.exists():
            if time.monotonic() > deadline:
                raise InterfaceError("daemon started but its UAPI socket did not appear")
            time.sleep(0.02)
        with contextlib.suppress(UapiClientError, ValueError):
            state.daemon_pid = int(self.uapi.stats().get("pid", "0")) or None

    def _uapi_config(self, state: UpState) -> str:
        ic = self.config.interface
        lines = ["replace_peers=true"]
        if ic.private_key is not None:
            lines.append(f"private_key={ic.private_key.hex()}")
        if ic.listen_port is not None:
            lines.append(f"listen_port={ic.listen_port}")
        fwmark = ic.fwmark
        if not fwmark and self._wants_policy_routing():
            fwmark = self._pick_table()
        if fwmark is not None:
            lines.append(f"fwmark={fwmark}")
            state.fwmark = fwmark
        for p in self.config.peers:
            lines.append(f"public_key={p.public_key.hex()}")
            if p.preshared_key is not None:
                lines.append(f"preshared_key={p.preshared_key.hex()}")
            if p.endpoint is not None:
                host, port = _resolve_endpoint(*p.endpoint)
                ep = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                lines.append(f"endpoint={ep}")
            if p.persistent_keepalive is not None:
                lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={net}" for net in p.allowed_ips]
        return "\n".join(lines)

    def _wants_policy_routing(self) -> bool:
        table = self.config.interface.table
        return (table in (None, "auto")) and any(
            net.prefixlen == 0 for p in self.config.peers for net in p.allowed_ips)

    def _pick_table(self) -> int:
        with NetConf(self.netns) as nc:
            table = DEFAULT_TABLE
            while nc.table_in_use(table):
                table += 1
            return table

    def _auto_mtu(self, nc: NetConf) -> int:
        """wg-quick's rule: the smallest path MTU toward the endpoints, minus 80."""
        mtus = []
        for p in self.config.peers:
            if p.endpoint is not None:
                with contextlib.suppress(InterfaceError):
                    host, _ = _resolve_endpoint(*p.endpoint)
                    if (m := nc.route_mtu(host)) is not None:
                        mtus.append(m)
        if not mtus and (m := nc.default_route_mtu()) is not None:
            mtus.append(m)
        return (min(mtus) if mtus else 1500) - MTU_OVERHEAD

    def _routes(self, nc: NetConf, state: UpState) -> None:
        table_setting = self.config.interface.table
        if table_setting == "off":
            return
        table: int | None = None
        if table_setting not in (None, "auto"):
            table = int(table_setting)
        nets = sorted({net for p in self.config.peers for net in p.allowed_ips},
                      key=lambda n: (n.version, -n.prefixlen, int(n.network_address)))
        policy_table = state.fwmark if self._wants_policy_routing() else None
        state.table = policy_table or table
        # Like wg-quick: a prefix the device already has a route for (e.g. the
        # connected route of an Address) is left as it is.
        existing = set(nc.routes(self.name, table))
        for net in nets:
            if net.prefixlen == 0 and policy_table:
                self._default_route(nc, state, net.version, policy_table)
            elif net not in existing:
                nc.add_route(net, self.name, table)

    def _default_route(self, nc: NetConf, state: UpState, version: int, table: int) -> None:
        """wg-quick's default-route setup: own table, `not fwmark` rule, suppress rule."""
        net = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
        nc.add_route(net, self.name, table)
        nc.add_rule(version, priority=RULE_PRIORITY_FWMARK, table=table, fwmark=table,
                    invert=True)
        state.rules.append({"version": version, "priority": RULE_PRIORITY_FWMARK, "table": table})
        nc.add_rule(version, priority=RULE_PRIORITY_SUPPRESS, table=254, suppress_prefixlength=0)
        state.rules.append({"version": version, "priority": RULE_PRIORITY_SUPPRESS, "table": 254})
        if version == 4:
            old = write_sysctl("net.ipv4.conf.all.src_valid_mark", "1", self.netns)
            if old is not None:
                state.sysctls.append(("net.ipv4.conf.all.src_valid_mark", old))
        self._save_state(state)

    def _dns(self, state: UpState) -> None:
        dns = self.config.interface.dns
        if not dns:
            return
        resolvconf = shutil.which("resolvconf")
        if resolvconf is None:
            self.log("DNS= is set but resolvconf is not installed: DNS left unchanged")
            return
        ic = self.config.interface
        lines = [f"nameserver {d}" for d in ic.dns_servers]
        search = ic.dns_search
        if search:
            lines.append("search " + " ".join(search))
        subprocess.run([resolvconf, "-a", f"tun.{self.name}", "-m", "0", "-x"],
                       input="\n".join(lines) + "\n", text=True, check=True, timeout=30)
        state.dns = True

    # --------------------------------------------------------------------- down

    def down(self) -> None:
        """Undo what `up()` did (found in the state file); with SaveConfig, save first."""
        path = self.state_file
        if not path.exists():
            with NetConf(self.netns) as nc:
                if nc.link_index(self.name) is None:
                    raise InterfaceError(f"{self.name} is not up")
            raise InterfaceError(f"{self.name} exists but was not brought up by wgx "
                                 f"(no {path}); use `wg-quick down` or `ip link del`")
        state = self._load_state()
        assert state is not None
        dead = bool(state.daemon_pid) and not _daemon_alive(state.daemon_pid or 0, self.name)
        if self.config.interface.save_config and not dead:  # a dead daemon has nothing to save
            self.save_config()
        self._hooks("PreDown")
        self._undo(state)
        self._hooks("PostDown")

    def save_config(self) -> None:
        """Write the live peers, port and keys back into the config file (SaveConfig)."""
        self.config = with_live_state(self.config, self.uapi.get())
        tmp = Path(str(self.config.path) + ".tmp")
        tmp.write_text(cfg.dumps(self.config))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.config.path)

    def _undo(self, state: UpState) -> None:
        errors: list[str] = []
        if state.dns and (resolvconf := shutil.which("resolvconf")):
            subprocess.run([resolvconf, "-d", f"tun.{self.name}", "-f"], timeout=30)
        with NetConf(self.netns) as nc:
            for rule in reversed(state.rules):
                try:
                    nc.del_rule(rule["version"], priority=rule["priority"], table=rule["table"])
                except NetConfError as e:
                    errors.append(str(e))
            for key, old in reversed(state.sysctls):
                with contextlib.suppress(OSError):
                    write_sysctl(key, old, self.netns)
            if state.created_link:
                with contextlib.suppress(NetConfError):
                    nc.delete_link(self.name)
        self._wait_daemon_gone(state)
        self.state_file.unlink(missing_ok=True)
        log_file = daemon_log_path(self.name, self.netns)
        with contextlib.suppress(OSError):
            if log_file.stat().st_size == 0:  # one with errors in it stays for a look
                log_file.unlink()
        if self.netns:
            with contextlib.suppress(OSError):  # only if empty: other interfaces may be up
                self.state_file.parent.rmdir()
        if errors:
            raise InterfaceError("; ".join(errors))

    def _wait_daemon_gone(self, state: UpState) -> None:
        """Wait for the daemon to exit (it does when its link goes); TERM it after 5 s.

        A dead daemon's socket is removed; a pid is only signalled while it is
        still that daemon (pids get reused after a crash).
        """
        pid = state.daemon_pid
        deadline = time.monotonic() + 5
        while self.uapi.exists() and time.monotonic() < deadline:
            if pid and not _daemon_alive(pid, self.name):
                break
            time.sleep(0.02)
        if not self.uapi.exists():
            return
        if pid and _daemon_alive(pid, self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        elif not self.uapi.is_live():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uapi.path)


def _daemon_alive(pid: int, iface: str) -> bool:
    """Is `pid` a running wgx-userspace for `iface` (not a reused pid)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status not in ("Z", "X") and any(a.endswith(b"wgx-userspace") for a in argv) \
        and iface.encode() in argv


def with_live_state(config: cfg.Config, live: DeviceState) -> cfg.Config:
    """`config` with the daemon's current port, key and peers (what SaveConfig keeps)."""
    ic = dataclasses.replace(config.interface, private_key=live.private_key,
                             listen_port=live.listen_port or None)
    peers = [
        cfg.PeerConfig(
            public_key=p.public_key,
            preshared_key=p.preshared_key if any(p.preshared_key) else None,
            allowed_ips=[ipaddress.ip_network(n) for n in p.allowed_ips],
            endpoint=cfg.Endpoint(*p.endpoint) if p.endpoint else None,
            persistent_keepalive=p.persistent_keepalive or None,
        )
        for p in live.peers
    ]
    return dataclasses.replace(config, interface=ic, peers=peers)
