"""Linux TUN devices through /dev/net/tun (IFF_TUN | IFF_NO_PI).

`Tun.create(name)` makes (or attaches to) a layer-3 TUN device and returns a
non-blocking handle. The fd stays valid if the device is moved to another
network namespace; once the device is deleted, reads fail with EBADFD and
`TunGone` is raised so the daemon can exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUNSETQUEUE = 0x400454D9
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16
DEFAULT_MTU = 1420
MAX_PACKET = 65535


class TunGone(Exception):
    """The TUN device was deleted under us."""


class Tun:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @classmethod
    def create(cls, name: str, multi_queue: bool = False) -> Tun:
        """Open /dev/net/tun and attach it to device `name` (created if absent)."""
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise ValueError(f"invalid interface name {name!r}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
        try:
            ifr = struct.pack("16sH22x", name.encode(), flags)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        actual = res[:IFNAMSIZ].rstrip(b"\0").decode()
        return cls(fd, actual)

    def set_queue_enabled(self, enabled: bool) -> None:
        """Attach or detach this fd's queue of a multi-queue TUN (TUNSETQUEUE).

        A detached queue gets no packets (flows go to the other queues) but keeps
        the device alive. Attaching fails once the device is gone.
        """
        flags = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        fcntl.ioctl(self.fd, TUNSETQUEUE, struct.pack("16sH22x", b"", flags))

    def read(self) -> bytes | None:
        """One packet, or None if none is waiting. Raises TunGone if the device was deleted."""
        try:
            return os.read(self.fd, MAX_PACKET)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                raise TunGone(self.name) from e
            raise

    def write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            pass  # the kernel queue is full: drop, like a congested link
        except OSError as e:
            if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                raise TunGone(self.name) from e
            if e.errno not in (errno.EINVAL, errno.ENOBUFS):
                raise

    def mtu(self) -> int | None:
        """The device MTU as seen from the namespace we were created in, or None if not there."""
        try:
            res = fcntl.ioctl(self._ctl, SIOCGIFMTU, struct.pack("16si12x", self.name.encode(), 0))
        except OSError:
            return None
        return struct.unpack_from("16si", res)[1]

    def set_mtu(self, mtu: int) -> None:
        fcntl.ioctl(self._ctl, SIOCSIFMTU, struct.pack("16si12x", self.name.encode(), mtu))

    def close(self) -> None:
        self._ctl.close()
        os.close(self.fd)
