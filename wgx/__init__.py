"""wgx: a WireGuard-compatible VPN dataplane for Linux.

The provisioning API is `wgx.Interface` (see wgx.control.interface):

    from wgx import Interface
    iface = Interface.from_config("/etc/wireguard/wg0.conf")
    iface.up(); print(iface.peers); iface.down()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Interface", "InterfaceError", "__version__"]

if TYPE_CHECKING:
    from wgx.control.interface import Interface, InterfaceError


def __getattr__(name: str) -> Any:
    # Lazy: importing wgx must stay cheap for the daemon and the protocol core.
    if name in ("Interface", "InterfaceError"):
        from wgx.control import interface

        return getattr(interface, name)
    raise AttributeError(name)
