"""Client side of the UAPI: talk to any userspace WireGuard daemon's socket.

Works with wgx-userspace and wireguard-go alike (`get=1`, `set=1`); the
wgx-only `get=wgx` request returns wgx's counters. Answers are parsed into
plain dataclasses; keys stay raw bytes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from .uapi import SOCKET_DIR, parse_endpoint, socket_path

TIMEOUT = 5.0


class UapiClientError(RuntimeError):
    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass
class PeerState:
    public_key: bytes
    preshared_key: bytes = bytes(32)
    endpoint: tuple[str, int] | None = None
    last_handshake: float = 0.0  # wall-clock seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: list[str] = field(default_factory=list)


@dataclass
class DeviceState:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerState] = field(default_factory=list)


def _exchange(path: str, request: str) -> list[str]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(request.encode())
            buf = b""
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise UapiClientError(f"no daemon socket at {path}") from None
    except OSError as e:
        raise UapiClientError(f"{path}: {e}") from None
    lines = buf.decode("utf-8", "replace").rstrip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise UapiClientError(f"{path}: truncated answer")
    code = int(lines[-1][6:])
    if code:
        raise UapiClientError(f"{path}: request refused: {os.strerror(abs(code))}", abs(code))
    return lines[:-1]


class UapiClient:
    def __init__(self, iface: str, directory: str = SOCKET_DIR) -> None:
        self.iface = iface
        self.path = socket_path(iface, directory)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def is_live(self) -> bool:
        """Does a daemon accept connections on the socket (not just a stale file)?"""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.path)
            except OSError:
                return False
        return True

    def set(self, body: str) -> None:
        """Send `set=1` with key=value lines `body` (no trailing blank line needed)."""
        _exchange(self.path, "set=1\n" + body.strip("\n") + "\n\n")

    def get(self) -> DeviceState:
        dev = DeviceState()
        peer: PeerState | None = None
        for line in _exchange(self.path, "get=1\n\n"):
            key, _, value = line.partition("=")
            if key == "public_key":
                peer = PeerState(bytes.fromhex(value))
                dev.peers.append(peer)
            elif peer is None:
                if key == "private_key":
                    dev.private_key = bytes.fromhex(value)
                elif key == "listen_port":
                    dev.listen_port = int(value)
                elif key == "fwmark":
                    dev.fwmark = int(value)
            elif key == "preshared_key":
                peer.preshared_key = bytes.fromhex(value)
            elif key == "endpoint":
                peer.endpoint = parse_endpoint(value)
            elif key == "last_handshake_time_sec":
                peer.last_handshake += int(value)
            elif key == "last_handshake_time_nsec":
                peer.last_handshake += int(value) / 1e9
            elif key == "rx_bytes":
                peer.rx_bytes = int(value)
            elif key == "tx_bytes":
                peer.tx_bytes = int(value)
            elif key == "persistent_keepalive_interval":
                peer.persistent_keepalive = int(value)
            elif key == "allowed_ip":
                peer.allowed_ips.append(value)
        return dev

    def stats(self) -> dict[str, str]:
        """wgx's own counters (`get=wgx`); raises UapiClientError against other daemons."""
        return dict(line.partition("=")[::2] for line in _exchange(self.path, "get=wgx\n\n"))
