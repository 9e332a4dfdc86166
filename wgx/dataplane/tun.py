"""Linux TUN devices through /dev/net/tun (IFF_TUN | IFF_NO_PI).

`Tun.create(name)` makes (or attaches to) a layer-3 TUN device and returns a
non-blocking handle. With `vnet_hdr=True` the device runs with IFF_VNET_HDR
and TSO/checksum offloads (see wgx.dataplane.offload): reads may return TCP
super-packets of up to 64 KB behind a virtio-net header, to be split with
`offload.split_gso_batch`, and every write carries a virtio-net header
(`write` adds an empty one; `write_vnet` takes a buffer that has one, e.g.
from `offload.coalesce`; `uso` says whether the kernel accepted USO4|USO6,
i.e. whether UDP super-packets may be written). The fd stays valid if the device is moved to another
network namespace; once the device is deleted, reads fail with EBADFD and
`TunGone` is raised so the daemon can exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

from . import netdev, offload

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUNSETQUEUE = 0x400454D9
IFNAMSIZ = 16
DEFAULT_MTU = 1420
MAX_PACKET = 65535


class TunGone(Exception):
    """The TUN device was deleted under us."""


class Tun:
    def __init__(self, fd: int, name: str, vnet_hdr: bool = False, offloads: int = 0) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads  # TUN_F_* flags in effect (0 without vnet_hdr)
        # USO negotiated: the kernel takes (and may hand us) UDP_L4 super-packets.
        self.uso = vnet_hdr and offloads & offload.TUN_UDP_OFFLOADS == offload.TUN_UDP_OFFLOADS

    @classmethod
    def create(cls, name: str, multi_queue: bool = False, vnet_hdr: bool = False) -> Tun:
        """Open /dev/net/tun and attach it to device `name` (created if absent).

        All queues of a multi-queue device must use the same `vnet_hdr`.
        """
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise ValueError(f"invalid interface name {name!r}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
        if vnet_hdr:
            flags |= offload.IFF_VNET_HDR
        try:
            ifr = struct.pack("16sH22x", name.encode(), flags)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        actual = res[:IFNAMSIZ].rstrip(b"\0").decode()
        offloads = 0
        if vnet_hdr:
            try:
                offloads = offload.set_tun_offload(fd)
            except OSError:
                os.close(fd)
                raise
        return cls(fd, actual, vnet_hdr, offloads)

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
            return os.read(self.fd, MAX_PACKET + offload.VNET_HDR_LEN)
        except BlockingIOError:
            return None
        except OSError as e:
            self._raise_if_gone(e)
            raise

    def read_batch(self, max_n: int, max_bytes: int | None = None) -> list[bytes]:
        """Up to `max_n` raw reads (with their virtio-net header in vnet mode), stopping
        early once `max_bytes` have been read (so TSO super-packets bound the batch by
        size and small packets by count)."""
        out: list[bytes] = []
        fd, size, read = self.fd, MAX_PACKET + offload.VNET_HDR_LEN, os.read
        budget = max_bytes if max_bytes is not None else -1
        try:
            for _ in range(max_n):
                p = read(fd, size)
                out.append(p)
                if budget >= 0:
                    budget -= len(p)
                    if budget <= 0:
                        break
        except BlockingIOError:
            pass
        except OSError as e:
            self._raise_if_gone(e)
            raise
        return out

    def write(self, packet: bytes | memoryview) -> None:
        """Write one plain IP packet (an empty virtio-net header is added in vnet mode)."""
        if self.vnet_hdr:
            self._write(os.writev, (offload.VNET_ZERO, packet))
        else:
            self._write(os.write, packet)

    def write_vnet(self, buf: bytes | memoryview) -> None:
        """Write a buffer that starts with its own virtio-net header (vnet mode only)."""
        self._write(os.write, buf)

    def _write(self, op: Callable[[int, Any], int], data: Any) -> None:
        try:
            op(self.fd, data)
        except BlockingIOError:
            pass  # the kernel queue is full: drop, like a congested link
        except OSError as e:
            self._raise_if_gone(e)
            if e.errno not in (errno.EINVAL, errno.ENOBUFS):
                raise

    def _raise_if_gone(self, e: OSError) -> None:
        """TunGone for the errors of a deleted device."""
        if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
            raise TunGone(self.name) from e

    def mtu(self) -> int | None:
        """The device MTU as seen from the namespace we were created in, or None if not there."""
        return netdev.get_mtu(self.name)

    def set_mtu(self, mtu: int) -> None:
        netdev.set_mtu(self.name, mtu)

    def close(self) -> None:
        os.close(self.fd)
