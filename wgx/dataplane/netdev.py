"""Facts about a network device from ioctls on a socket of the current namespace.

The daemon may have joined its namespace with setns() (`wgx up --netns`),
which does not remount /sys, so /sys/class/net can describe another
namespace's devices; a socket ioctl always asks the namespace we are in.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCETHTOOL = 0x8946
SIOCGIFTXQLEN = 0x8942
SIOCSIFTXQLEN = 0x8943
ETHTOOL_GCHANNELS = 0x3C


def _ifreq(name: str, payload: bytes) -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def get_mtu(name: str) -> int | None:
    """The MTU of `name`, or None if there is no such device here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s, SIOCGIFMTU, _ifreq(name, b""))
        except OSError:
            return None
    return struct.unpack_from("i", res, 16)[0]


def set_mtu(name: str, mtu: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))


def get_txqueuelen(name: str) -> int:
    """The transmit queue length of `name` (packets)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s, SIOCGIFTXQLEN, _ifreq(name, b""))
    return struct.unpack_from("i", res, 16)[0]


def set_txqueuelen(name: str, qlen: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFTXQLEN, _ifreq(name, struct.pack("i", qlen)))


def rx_queues(name: str) -> int:
    """Active RX queues (ethtool channels: rx + combined); 1 if the driver does not say."""
    chan = (ctypes.c_uint32 * 9)(ETHTOOL_GCHANNELS)
    req = bytearray(_ifreq(name, struct.pack("P", ctypes.addressof(chan))))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, SIOCETHTOOL, req)
        except OSError:
            return 1
    rx, combined = chan[5], chan[8]
    return max(1, rx + combined)
