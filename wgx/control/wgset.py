"""`wg set` argument grammar, translated into a UAPI `set=1` body.

    [listen-port P] [fwmark M|off] [private-key FILE]
    [peer PUBKEY [remove] [preshared-key FILE] [endpoint HOST:PORT]
                 [persistent-keepalive N|off] [allowed-ips IP/CIDR[,...]]]...

Like wg(8): key files hold base64 keys ("/dev/null" clears a key), an
`allowed-ips` list replaces the peer's list (a `+`/`-` prefix on an entry
adds/removes a single prefix instead), and endpoint host names are resolved
here. Errors raise `WgSetError` with the offending argument.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from pathlib import Path

from wgx.protocol.engine import ConfigError, check_public_key


class WgSetError(ValueError):
    pass


def _b64key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise WgSetError(f"{what}: not a valid base64 32-byte key")
    return raw


def _key_file(path: str, what: str) -> bytes:
    if path == "/dev/null":
        return bytes(32)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise WgSetError(f"{what}: cannot read {path}: {e.strerror}") from None
    return _b64key(text, f"{what} in {path}")


def resolve_endpoint(value: str) -> str:
    """HOST:PORT or [V6]:PORT -> a UAPI endpoint with a numeric address."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise WgSetError(f"endpoint: {value!r} is not HOST:PORT")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise WgSetError(f"endpoint: cannot resolve {host}: {e.strerror}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    addr = infos[0][4][0]
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _int(value: str, what: str, hi: int, off_ok: bool = False) -> int:
    if off_ok and value == "off":
        return 0
    try:
        n = int(value, 0)
    except ValueError:
        n = -1
    if not 0 <= n <= hi:
        raise WgSetError(f"{what}: {value!r} is not a number in 0..{hi}")
    return n


def to_uapi(args: list[str]) -> str:
    """The UAPI body (without `set=1`) for `wg set IFACE <args>`."""
    out: list[str] = []
    i = 0

    def take(what: str) -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise WgSetError(f"{what}: missing value")
        i += 2
        return args[i - 1]

    in_peer = False
    while i < len(args):
        word = args[i]
        if word == "peer":
            pub = _b64key(take("peer"), "peer")
            try:
                check_public_key(pub)
            except ConfigError as e:
                raise WgSetError(f"peer: {e}") from None
            out.append(f"public_key={pub.hex()}")
            in_peer = True
        elif not in_peer and word == "listen-port":
            out.append(f"listen_port={_int(take(word), word, 65535)}")
        elif not in_peer and word == "fwmark":
            out.append(f"fwmark={_int(take(word), word, 0xFFFFFFFF, off_ok=True)}")
        elif not in_peer and word == "private-key":
            out.append(f"private_key={_key_file(take(word), word).hex()}")
        elif in_peer and word == "remove":
            out.append("remove=true")
            i += 1
        elif in_peer and word == "preshared-key":
            out.append(f"preshared_key={_key_file(take(word), word).hex()}")
        elif in_peer and word == "endpoint":
            out.append(f"endpoint={resolve_endpoint(take(word))}")
        elif in_peer and word == "persistent-keepalive":
            out.append(f"persistent_keepalive_interval={_int(take(word), word, 65535, True)}")
        elif in_peer and word == "allowed-ips":
            out += _allowed_ips(take(word))
        else:
            where = "peer" if in_peer else "interface"
            raise WgSetError(f"unknown {where} argument {word!r}")
    return "\n".join(out)


def _allowed_ips(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    incremental = bool(items) and all(v[0] in "+-" for v in items)
    out = [] if incremental else ["replace_allowed_ips=true"]
    for v in items:
        sign = v[0] if v[0] in "+-" else ""
        try:
            net = ipaddress.ip_network(v.lstrip("+-"), strict=False)
        except ValueError:
            raise WgSetError(f"allowed-ips: {v!r} is not an IP/CIDR") from None
        out.append(f"allowed_ip={'-' if sign == '-' else ''}{net}")
    return out
