"""Prometheus metrics for every userspace WireGuard interface on the host.

Metric names follow the popular WireGuard exporters
(`wireguard_peer_receive_bytes_total`, `wireguard_peer_transmit_bytes_total`,
`wireguard_peer_last_handshake_seconds`, labelled by `interface` and
`public_key`); wgx's own counters (drops by reason, protocol stats) are added
for wgx interfaces as `wgx_drops_total` and `wgx_events_total`. The HTTP
server is the standard library's, serving GET /metrics only.
"""

from __future__ import annotations

import base64
import glob
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .uapi import SOCKET_DIR
from .uapi_client import UapiClient, UapiClientError


def interfaces(directory: str = SOCKET_DIR) -> list[str]:
    """Interfaces with a UAPI socket in `directory`, sorted."""
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(directory, "*.sock")))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(directory: str = SOCKET_DIR) -> str:
    """The metrics page in the Prometheus text exposition format."""
    families: dict[str, tuple[str, str, list[str]]] = {}

    def add(name: str, kind: str, help_: str, labels: dict[str, str], value: float) -> None:
        fam = families.setdefault(name, (kind, help_, []))
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{lab}}} {value}")

    for iface in interfaces(directory):
        client = UapiClient(iface, directory)
        try:
            dev = client.get()
        except UapiClientError:
            continue
        add("wireguard_device_info", "gauge", "Interfaces with a UAPI socket.",
            {"interface": iface, "listen_port": str(dev.listen_port)}, 1)
        for peer in dev.peers:
            labels = {"interface": iface,
                      "public_key": base64.b64encode(peer.public_key).decode()}
            add("wireguard_peer_receive_bytes_total", "counter",
                "Bytes received from the peer.", labels, peer.rx_bytes)
            add("wireguard_peer_transmit_bytes_total", "counter",
                "Bytes sent to the peer.", labels, peer.tx_bytes)
            add("wireguard_peer_last_handshake_seconds", "gauge",
                "Unix time of the last completed handshake (0 = never).", labels,
                round(peer.last_handshake, 3))
        try:
            stats = client.stats()
        except UapiClientError:
            continue  # not a wgx daemon
        for key, value in stats.items():
            if not value.isdigit():
                continue
            if key.startswith("drop."):
                add("wgx_drops_total", "counter", "Datagrams and packets dropped, by reason.",
                    {"interface": iface, "reason": key[5:]}, int(value))
            elif key.startswith("stat."):
                add("wgx_events_total", "counter", "Protocol events, by name.",
                    {"interface": iface, "event": key[5:]}, int(value))
    out: list[str] = []
    for name, (kind, help_, samples) in families.items():
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)
    return "\n".join(out) + "\n"


def serve(host: str, port: int, directory: str = SOCKET_DIR) -> ThreadingHTTPServer:
    """A server (not yet serving: call serve_forever) exposing /metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            body = render(directory).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return ThreadingHTTPServer((host, port), Handler)
