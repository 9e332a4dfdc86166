"""The plain UDP socket dataplane: one IPv4 and one IPv6 socket on one port.

This is the always-available path (and the fallback when XDP cannot be used,
e.g. on `lo`). Like wireguard-go, the IPv6 socket is V6ONLY and both sockets
share the port; port 0 picks a free port for both. The sockets stay in the
network namespace they were created in, even if the TUN device moves.
"""

from __future__ import annotations

import contextlib
import errno
import socket

SO_MARK = 36
RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20

Endpoint = tuple[str, int]


class UdpSockets:
    def __init__(self, port: int = 0, fwmark: int = 0) -> None:
        self.v4: socket.socket | None = None
        self.v6: socket.socket | None = None
        self.port = 0
        self.bind(port)
        self.set_fwmark(fwmark)

    def bind(self, port: int) -> None:
        """(Re)bind both sockets to `port`; on failure the old sockets are kept."""
        for _ in range(10 if port == 0 else 1):
            v4, v6 = self._open(port)
            if v4 or v6:
                break
        else:
            raise OSError(errno.EADDRINUSE, f"cannot bind UDP port {port}")
        self.close()
        self.v4, self.v6 = v4, v6
        self.port = (v4 or v6).getsockname()[1]  # type: ignore[union-attr]

    @staticmethod
    def _open(port: int) -> tuple[socket.socket | None, socket.socket | None]:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            v4.bind(("0.0.0.0", port))
        except OSError:
            v4.close()
            if port:
                raise
            return None, None
        actual = v4.getsockname()[1]
        v6: socket.socket | None = None
        if socket.has_ipv6:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                v6.bind(("::", actual))
            except OSError as e:
                v6.close()
                v6 = None
                if e.errno == errno.EADDRINUSE:
                    v4.close()
                    if port:
                        raise
                    return None, None  # port 0: the v6 port was taken, retry another
        for s in (v4, v6):
            if s is not None:
                s.setblocking(False)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        return v4, v6

    def set_fwmark(self, mark: int) -> None:
        for s in self.sockets():
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def recv(self, sock: socket.socket) -> tuple[bytes, Endpoint] | None:
        try:
            data, addr = sock.recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # e.g. ICMP errors surfacing as ECONNREFUSED
        return data, (addr[0], addr[1])

    def send(self, data: bytes, ep: Endpoint) -> bool:
        sock = self.v6 if ":" in ep[0] else self.v4
        if sock is None:
            return False
        try:
            sock.sendto(data, ep)
        except OSError:
            return False  # unreachable, buffer full: the protocol's timers retry
        return True

    def close(self) -> None:
        for s in self.sockets():
            s.close()
        self.v4 = self.v6 = None
