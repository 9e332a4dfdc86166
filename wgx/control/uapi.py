"""The cross-platform userspace API (https://www.wireguard.com/xplatform/).

A `get=1` request returns the interface as key=value lines; a `set=1`
request changes it. Unlike wireguard-go, a set request is parsed and
validated completely before anything is applied, so a bad request changes
nothing. Errors are answered as `errno=-N` (negative errno), as wireguard-go
does. `UapiServer` serves the protocol on a unix socket inside the daemon's
event loop (non-blocking, one request at a time per connection).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Protocol

from wgx.protocol.engine import ConfigError, Engine, check_public_key

log = logging.getLogger("wgx.uapi")

SOCKET_DIR = "/var/run/wireguard"
# Root-only: a socket there configures keys and routes.  wireguard-go creates the
# directory 0755; the socket itself is 0600 either way, the directory adds a
# second barrier and hides which interfaces exist.
SOCKET_DIR_MODE = 0o700
MAX_REQUEST = 1 << 20
MAX_CLIENTS = 16

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# ASCII only, as wireguard-go's strconv/hex: str.isdigit() also takes '²' (int() then raises)
# and '١٢' (int() gives 12), bytes.fromhex() skips whitespace. The length bound keeps int()
# below Python's 4300-digit conversion limit.
_DECIMAL = re.compile(r"[0-9]{1,20}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


class UapiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PeerChange:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[tuple[bool, Network]] = field(default_factory=list)  # (add?, network)


_UNSET = object()


@dataclass
class InterfaceChange:
    private_key: bytes | None | object = _UNSET
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerChange] = field(default_factory=list)


class DeviceControl(Protocol):
    """What the UAPI needs from the daemon beyond the engine."""

    engine: Engine

    def set_listen_port(self, port: int) -> None: ...

    def set_fwmark(self, mark: int) -> None: ...

    def now(self) -> float: ...


def _key(value: str, name: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(errno.EINVAL, f"{name}: expected 64 hex digits")
    return bytes.fromhex(value)


def _bool_true(value: str, name: str) -> bool:
    if value != "true":
        raise UapiError(errno.EINVAL, f"{name}: only 'true' is accepted")
    return True


def _int(value: str, name: str, hi: int) -> int:
    if not _DECIMAL.fullmatch(value) or int(value) > hi:
        raise UapiError(errno.EINVAL, f"{name}: expected an integer 0..{hi}")
    return int(value)


def parse_endpoint(value: str) -> tuple[str, int]:
    """'1.2.3.4:51820' or '[fd00::1]:51820' (no names: the client resolves them)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    try:
        if not sep or not _DECIMAL.fullmatch(port) or not 0 < int(port) < 65536:
            raise ValueError
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise UapiError(errno.EINVAL, f"endpoint: invalid {value!r}") from None
    return str(addr), int(port)


def format_endpoint(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def parse_set(lines: list[str]) -> InterfaceChange:
    """Parse the body of a set=1 request (without the set=1 line). Raises UapiError."""
    change = InterfaceChange()
    peer: PeerChange | None = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(errno.EINVAL, f"malformed line {line!r}")
        if key == "public_key":
            peer = PeerChange(_key(value, key))
            change.peers.append(peer)
            continue
        if peer is None:
            if key == "private_key":
                k = _key(value, key)
                change.private_key = None if k == bytes(32) else k
            elif key == "listen_port":
                change.listen_port = _int(value, key, 65535)
            elif key == "fwmark":
                change.fwmark = _int(value, key, 0xFFFFFFFF) if value else 0
            elif key == "replace_peers":
                change.replace_peers = _bool_true(value, key)
            else:
                raise UapiError(errno.EINVAL, f"unknown interface key {key!r}")
            continue
        if key == "remove":
            peer.remove = _bool_true(value, key)
        elif key == "update_only":
            peer.update_only = _bool_true(value, key)
        elif key == "preshared_key":
            peer.preshared_key = _key(value, key)
        elif key == "endpoint":
            peer.endpoint = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = _int(value, key, 65535)
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _bool_true(value, key)
        elif key == "allowed_ip":
            add = not value.startswith("-")
            try:
                net = ipaddress.ip_network(value.lstrip("-"), strict=False)
            except ValueError:
                raise UapiError(errno.EINVAL, f"allowed_ip: invalid {value!r}") from None
            peer.allowed_ips.append((add, net))
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(errno.EINVAL, f"protocol_version {value!r} is not supported")
        else:
            raise UapiError(errno.EINVAL, f"unknown peer key {key!r}")
    for p in change.peers:
        if not p.remove:
            try:
                check_public_key(p.public_key)
            except ConfigError as e:
                raise UapiError(errno.EINVAL, f"public_key: {e}") from None
    return change


def apply_set(dev: DeviceControl, change: InterfaceChange) -> None:
    """Apply a validated change. Only the socket operations can still fail, and they
    come first: the listen-port bind, then the fwmark (SO_MARK needs CAP_NET_ADMIN),
    whose failure puts the old port back; either way nothing else is applied."""
    engine = dev.engine
    now = dev.now()
    old_port = engine.listen_port
    port_changed = False
    if change.listen_port is not None and change.listen_port != engine.listen_port:
        try:
            dev.set_listen_port(change.listen_port)
        except OSError as e:
            raise UapiError(e.errno or errno.EADDRINUSE, f"listen_port: {e}") from None
        port_changed = True
    if change.fwmark is not None:
        try:
            dev.set_fwmark(change.fwmark)
        except OSError as e:
            if port_changed:
                try:
                    dev.set_listen_port(old_port)
                except OSError as e2:
                    log.warning("could not go back to listen port %d: %s", old_port, e2)
            raise UapiError(e.errno or errno.EPERM, f"fwmark: {e}") from None
    if change.private_key is not _UNSET:
        engine.set_private_key(change.private_key)  # type: ignore[arg-type]
    if change.replace_peers:
        for pub in list(engine.peers):
            engine.remove_peer(pub)
    for pc in change.peers:
        if pc.public_key == engine.public_key:
            continue  # our own key: ignored, as wireguard-go does
        if pc.remove:
            engine.remove_peer(pc.public_key)
            continue
        if pc.update_only and pc.public_key not in engine.peers:
            continue
        peer = engine.add_peer(pc.public_key)
        if pc.preshared_key is not None:
            peer.preshared_key = pc.preshared_key
        if pc.endpoint is not None:
            peer.endpoint = pc.endpoint
        if pc.replace_allowed_ips:
            engine.allowed.remove_value(peer)
        for add, net in pc.allowed_ips:
            if add:
                engine.allowed.insert(net, peer)
            else:
                engine.allowed.remove(net, peer)
        if pc.persistent_keepalive is not None:
            engine.set_persistent_keepalive(peer, pc.persistent_keepalive, now)


def format_get(engine: Engine, now: float) -> str:
    """The body of a get=1 answer, without the trailing errno line."""
    out: list[str] = []
    if engine.private_key is not None:
        out.append(f"private_key={engine.private_key.hex()}")
    if engine.listen_port:
        out.append(f"listen_port={engine.listen_port}")
    if engine.fwmark:
        out.append(f"fwmark={engine.fwmark}")
    for peer in engine.peers.values():
        out.append(f"public_key={peer.public_key.hex()}")
        out.append(f"preshared_key={peer.preshared_key.hex()}")
        out.append("protocol_version=1")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}")
        if peer.last_handshake is not None:
            wall_ns = int(engine.wall_time(peer.last_handshake) * 1e9)
            sec, nsec = divmod(wall_ns, 1_000_000_000)
        else:
            sec = nsec = 0
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={nsec}")
        out.append(f"tx_bytes={peer.tx_bytes}")
        out.append(f"rx_bytes={peer.rx_bytes}")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        out.extend(f"allowed_ip={net}" for net in engine.allowed.entries(peer))
    return "".join(line + "\n" for line in out)


def format_stats(engine: Engine, extra: dict[str, object]) -> str:
    """Body of wgx's own `get=wgx` request: dataplane facts and drop/stat counters."""
    out = [f"{k}={v}" for k, v in extra.items()]
    out += [f"drop.{k}={v}" for k, v in sorted(engine.drops.items())]
    out += [f"stat.{k}={v}" for k, v in sorted(engine.stats.items())]
    return "".join(line + "\n" for line in out)


def handle_request(dev: DeviceControl, request: str, extra: dict[str, object]) -> str:
    """Answer one request (text up to and excluding the blank line)."""
    lines = request.split("\n")
    op = lines[0]
    try:
        if op == "get=1":
            if len(lines) > 1:
                raise UapiError(errno.EINVAL, "get takes no arguments")
            return format_get(dev.engine, dev.now()) + "errno=0\n\n"
        if op == "get=wgx":
            return format_stats(dev.engine, extra) + "errno=0\n\n"
        if op == "set=1":
            apply_set(dev, parse_set(lines[1:]))
            return "errno=0\n\n"
        raise UapiError(errno.EINVAL, f"unknown operation {op[:32]!r}")
    except UapiError as e:
        log.info("uapi request refused: %s", e)
        return f"errno={-e.code}\n\n"


def take_requests(buf: bytearray) -> list[str]:
    """Remove every complete request (ended by a blank line) from `buf`, as text.

    Bytes that are not UTF-8 become U+FFFD, so they reach the parser as text and are
    refused there; an incomplete tail stays in `buf`.
    """
    out = []
    while (end := buf.find(b"\n\n")) >= 0:
        out.append(bytes(buf[:end]).decode("utf-8", "replace"))
        del buf[: end + 2]
    return out


def socket_path(iface: str, directory: str = SOCKET_DIR) -> str:
    return os.path.join(directory, f"{iface}.sock")


class UapiServer:
    """Non-blocking unix-socket server; the daemon polls `fds()` and calls `on_ready`."""

    def __init__(self, iface: str, directory: str = SOCKET_DIR) -> None:
        self.path = socket_path(iface, directory)
        os.makedirs(directory, mode=SOCKET_DIR_MODE, exist_ok=True)
        os.chmod(directory, SOCKET_DIR_MODE)
        self._claim_path()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.listener.listen(MAX_CLIENTS)
        self.listener.setblocking(False)
        self.inode = os.stat(self.path).st_ino
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}

    def _claim_path(self) -> None:
        """Refuse if a live daemon owns the socket; remove a stale one."""
        if not os.path.exists(self.path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
        else:
            raise OSError(errno.EADDRINUSE, f"{self.path} is in use by a running daemon")
        finally:
            probe.close()

    def still_ours(self) -> bool:
        """False once our socket file was removed or replaced: the daemon should exit."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return st.st_ino == self.inode and stat.S_ISSOCK(st.st_mode)

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return None
        conn.setblocking(False)
        self.clients[conn.fileno()] = (conn, bytearray())
        return conn

    def on_readable(self, fd: int, dev: DeviceControl, extra: dict[str, object]) -> bool:
        """Serve what a client sent; False when the client is gone (caller unregisters fd)."""
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data or len(buf) + len(data) > MAX_REQUEST:
            self.drop(fd)
            return False
        buf += data
        for request in take_requests(buf):
            answer = handle_request(dev, request, extra).encode()
            try:
                conn.setblocking(True)
                conn.settimeout(2.0)
                conn.sendall(answer)
                conn.setblocking(False)
            except OSError:
                self.drop(fd)
                return False
        return True

    def drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self.drop(fd)
        self.listener.close()
        if self.still_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
