"""wgx: a WireGuard-compatible VPN dataplane for Linux."""

__version__ = "0.1.0"
