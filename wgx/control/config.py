"""wg-quick(8) configuration files: parse, validate, write back.

Pure: no network, no processes, no name resolution. The file format is the one of
/etc/wireguard/*.conf. Two programs read such a file and this module follows both:

* wg-quick (wireguard-tools src/wg-quick/linux.bash, ``parse_options``) reads each line,
  drops everything from the first ``#``, splits at the first ``=`` and trims whitespace
  around key and value. Inside ``[Interface]`` it consumes its own keys, matched
  case-insensitively: Address, DNS, MTU, Table, PreUp, PostUp, PreDown, PostDown,
  SaveConfig. Address and DNS split on commas and whitespace, and all of them
  accumulate over repeated lines; hooks keep their order and, as in current upstream,
  the raw text after ``=`` (a ``#`` inside a hook is left for bash). Every other line is
  passed on to ``wg setconf``.
* wg (src/config.c, ``config_read_line``/``process_line``) drops everything from the
  first ``#``, then deletes *every* whitespace character on the line, so
  ``Allowed IPs = 10.0.0.0/8 , fd00::/8`` is ``AllowedIPs=10.0.0.0/8,fd00::/8``. Section
  headers and keys are case-insensitive. An empty value is refused. Repeated
  AllowedIPs accumulate; other repeated keys: the last one wins.

Errors are :class:`ConfigError` (``path:line: message``), one per file: the first found.
Things wg accepts silently but that change the meaning are kept in
:attr:`Config.warnings` (for example AllowedIPs with host bits set).

Where this module is stricter than wg/wg-quick (each is an error): a second [Interface]
section; the same PublicKey in two peers; low-order public keys; +/- AllowedIPs entries;
port names instead of numbers; Endpoint port 0; brackets around a non-IPv6 endpoint host
and IPv6 endpoints without brackets (wg splits at the last colon); MTU outside 576..65535,
or below 1280 with an IPv6 Address; Address prefixes as dotted netmasks; an empty MTU,
Table or SaveConfig; a leading byte order mark. AllowedIPs with host bits set are
accepted and stored masked (the kernel ignores the host part; newer wg warns).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from wgx.protocol.engine import ConfigError as EngineConfigError
from wgx.protocol.engine import check_public_key

__all__ = [
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "Endpoint",
    "InterfaceConfig",
    "PeerConfig",
    "dumps",
    "hooks",
    "interface_name",
    "is_low_order",
    "load",
    "loads",
    "permission_warning",
    "resolve",
    "validate_for_up",
    "wg_setconf_text",
]

CONFIG_DIR = "/etc/wireguard"
MTU_MIN = 576  # the IPv4 datagram every host must accept (RFC 791)
MTU_MIN_IPV6 = 1280  # RFC 8200; below it Linux removes a link's IPv6 addresses
MTU_MAX = 65535

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HookStage = Literal["pre_up", "post_up", "pre_down", "post_down"]

_WS = " \t\n\v\f\r"  # C-locale isspace(): wg's char_is_space and bash's [[:space:]]
_IFACE_RE = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")  # wg-quick's interface name rule
_CONF_RE = re.compile(r"(?:^|/)([a-zA-Z0-9_=+.-]{1,15})\.conf\Z")
# Bounded so int() stays cheap; every number here is out of range long before 30 digits.
_DIGITS = re.compile(r"[0-9]{1,30}")
_HEX = re.compile(r"0x[0-9a-fA-F]{1,30}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
_SEARCH_RE = re.compile(rf"~?(?:{_LABEL}\.)*{_LABEL}\.?|~\.")
_TABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_DNS_IS_SERVER = re.compile(r"^[0-9.]+$|:")  # wg-quick: (^[0-9.]+$)|(^.*:.*$)
_LIST_SPLIT = re.compile(r"[, \t]+")  # ${value//,/ } then IFS word splitting
_SECRET = {"secret": True}
# 20+ base64 characters, also when spaces split them: wg deletes whitespace, so
# `PrivateKey = abcd efgh...' is a valid key and its pieces are key material too.
_KEYLIKE = re.compile(r"[A-Za-z0-9+/](?:[ \t\v\f\r]*[A-Za-z0-9+/]){19,}(?:[ \t\v\f\r]*=){0,2}")

class ConfigError(ValueError):
    """A configuration problem at ``path:line``; line 0 means the file as a whole."""

    def __init__(self, path: str | os.PathLike[str], line: int, message: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class Endpoint(NamedTuple):
    """A peer endpoint. ``host`` is an IPv4/IPv6 literal (no brackets) or a hostname."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _safe_repr(obj: Any) -> str:
    """dataclass-like repr that never shows secret fields and prints keys as base64."""
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret"):
            if value is not None:
                parts.append(f"{f.name}=<redacted>")
        elif f.repr:
            shown = _b64(value) if isinstance(value, bytes) else repr(value)
            parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(repr=False)
class InterfaceConfig:
    """The [Interface] section. ``line``/``lines`` (header / last line of each key) are
    for messages only and take no part in equality."""

    private_key: bytes | None = field(default=None, repr=False, metadata=_SECRET)
    listen_port: int | None = None
    fwmark: int | None = None  # "off" is 0
    addresses: list[IPInterface] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)  # servers and search domains, in order
    mtu: int | None = None
    table: str | None = None
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool = False
    line: int | None = field(default=None, compare=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    __repr__ = _safe_repr

    @property
    def dns_servers(self) -> list[str]:
        """DNS entries wg-quick hands to resolvconf as ``nameserver``."""
        return [d for d in self.dns if _DNS_IS_SERVER.search(d)]

    @property
    def dns_search(self) -> list[str]:
        """DNS entries wg-quick hands to resolvconf as ``search`` domains."""
        return [d for d in self.dns if not _DNS_IS_SERVER.search(d)]


@dataclass(repr=False)
class PeerConfig:
    """One [Peer] section. ``line`` is its header line, ``lines`` the last line of each
    key; neither takes part in equality."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False, metadata=_SECRET)
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None  # "off" is 0
    line: int | None = field(default=None, compare=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    __repr__ = _safe_repr


@dataclass(repr=False)
class Config:
    """A whole file. Equality compares interface and peers only (not path/warnings)."""

    path: str = field(default="<string>", compare=False)
    interface: InterfaceConfig = field(default_factory=InterfaceConfig)
    peers: list[PeerConfig] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    __repr__ = _safe_repr


# ---------------------------------------------------------------------------- parsing

_QUICK_KEYS = {k.lower(): k for k in (
    "Address", "DNS", "MTU", "Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig")}
_IFACE_WG_KEYS = {k.lower(): k for k in ("PrivateKey", "ListenPort", "FwMark")}
_PEER_KEYS = {k.lower(): k for k in (
    "PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive")}
_HOOK_ATTR = {"PreUp": "pre_up", "PostUp": "post_up", "PreDown": "pre_down",
              "PostDown": "post_down"}
_SCALARS = {"PrivateKey", "ListenPort", "FwMark", "MTU", "Table", "SaveConfig", "PublicKey",
            "PresharedKey", "Endpoint", "PersistentKeepalive"}
_PEER_NO_KEY = b""  # placeholder until the section's PublicKey line


def _shown(text: str) -> str:
    """`text` with anything that looks like key material replaced.

    `PrivateKey: <base64>` has no `=` before the key, so a message that repeats
    the malformed key name would otherwise echo the secret, and a key pasted into
    another field or a section header would come back with that field's error.
    Every piece of input text an error message repeats goes through here, so runs
    of 20 or more base64 characters (whitespace between them ignored) never appear
    in an error message. The one exception is the value of a PublicKey line: it is
    public by definition and named on purpose (not a key, low-order, duplicate).
    """
    return _KEYLIKE.sub("<redacted>", text)


def _squash(s: str) -> str:
    """Delete every whitespace character, as wg's config_read_line does."""
    return s.translate({ord(c): None for c in _WS})


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def _decode_key(value: str) -> bytes | None:
    """Key as wg's key_from_base64 takes it: 44 chars of canonical base64 of 32 bytes."""
    if len(value) != 44 or not value.endswith("=") or not value.isascii():
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 32 and _b64(raw) == value else None


def is_low_order(public_key: bytes) -> bool:
    """True if the 32-byte X25519 public key is a point of small order (the engine's rule)."""
    try:
        check_public_key(public_key)
    except EngineConfigError:
        return True
    return False


def _parse_ip(text: str, allow_scope: bool = False) -> IPAddress | None:
    if not text or (not allow_scope and "%" in text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.cfg = Config(path=path)
        self.section: Literal["interface", "peer"] | None = None
        self.peer: PeerConfig | None = None

    def error(self, line: int, message: str) -> ConfigError:
        # One error, one line: escape control characters echoed from the file.
        shown = "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in message)
        return ConfigError(self.path, line, shown)

    def warn(self, line: int, message: str) -> None:
        self.cfg.warnings.append(f"{self.path}:{line}: {message}")

    def parse(self, text: str) -> Config:
        if text.startswith("\ufeff"):
            raise self.error(1, "file starts with a UTF-8 byte order mark, which wg refuses")
        for n, raw in enumerate(text.split("\n"), 1):
            self.line(n, raw)
        self.end_section()
        self.finish()
        return self.cfg

    # -- lines and sections

    def line(self, n: int, raw: str) -> None:
        stripped = raw.split("#", 1)[0]
        head = stripped.strip(_WS)
        if not head:
            return
        if head.startswith("["):
            self.header(n, head)
            return
        if "=" not in stripped:
            raise self.error(n, f"expected `Key = Value', got `{_shown(head)}'")
        key, value = (s.strip(_WS) for s in stripped.split("=", 1))
        if self.section is None:
            raise self.error(n, f"`{_shown(key)}' is outside a section; expected [Interface] or"
                                " [Peer] before it")
        if self.section == "interface" and key.lower() in _QUICK_KEYS:
            canon = _QUICK_KEYS[key.lower()]
            self.note(self.cfg.interface.lines, n, canon)
            if canon in _HOOK_ATTR:  # upstream wg-quick keeps the raw text, `#' included
                value = raw.split("=", 1)[1].strip(_WS)
            self.quick_key(n, canon, value)
            return
        lookup = _squash(key).lower()
        if self.section == "interface":
            own, name, elsewhere = _IFACE_WG_KEYS, "[Interface]", lookup in _PEER_KEYS
        else:
            own, name = _PEER_KEYS, "[Peer]"
            elsewhere = lookup in _IFACE_WG_KEYS or key.lower() in _QUICK_KEYS
        if lookup not in own:
            if elsewhere:
                other = "[Interface]" if self.section == "peer" else "[Peer]"
                raise self.error(n, f"`{_shown(key)}' belongs in {other}, not {name}")
            raise self.error(n, f"unknown key `{_shown(key)}' in {name}")
        canon = own[lookup]
        squashed = _squash(value)
        if not squashed:
            raise self.error(n, f"{canon} has an empty value")
        if self.section == "interface":
            self.note(self.cfg.interface.lines, n, canon)
            self.interface_key(n, canon, value, squashed)
        else:
            assert self.peer is not None
            self.note(self.peer.lines, n, canon)
            self.peer_key(n, canon, value, squashed)

    def note(self, lines: dict[str, int], n: int, canon: str) -> None:
        if canon in _SCALARS and canon in lines:
            self.warn(n, f"{canon} repeats line {lines[canon]}; the last value wins")
        lines[canon] = n

    def header(self, n: int, head: str) -> None:
        name = _squash(head).lower()
        if name == "[interface]":
            self.end_section()
            if self.cfg.interface.line is not None:
                raise self.error(n, "duplicate [Interface] section"
                                    f" (the first is at line {self.cfg.interface.line})")
            self.cfg.interface.line = n
            self.section = "interface"
        elif name == "[peer]":
            self.end_section()
            self.peer = PeerConfig(public_key=_PEER_NO_KEY, line=n)
            self.cfg.peers.append(self.peer)
            self.section = "peer"
        else:
            raise self.error(n, f"unknown section `{_shown(head)}'; expected [Interface] or [Peer]")

    def end_section(self) -> None:
        if self.peer is not None and self.peer.public_key == _PEER_NO_KEY:
            raise self.error(self.peer.line or 0, "peer has no PublicKey")
        self.peer = None

    # -- wg-quick's own keys

    def quick_key(self, n: int, key: str, value: str) -> None:
        iface = self.cfg.interface
        if key == "Address":
            for tok in _LIST_SPLIT.split(value):
                if tok:
                    iface.addresses.append(self.address(n, tok))
        elif key == "DNS":
            for tok in _LIST_SPLIT.split(value):
                if tok:
                    iface.dns.append(self.dns_entry(n, tok))
        elif key == "MTU":
            if not _DIGITS.fullmatch(value) or not MTU_MIN <= int(value) <= MTU_MAX:
                raise self.error(n, f"invalid MTU `{_shown(value)}': expected an integer in"
                                    f" {MTU_MIN}..{MTU_MAX}")
            iface.mtu = int(value)
        elif key == "Table":
            iface.table = self.table(n, value)
        elif key == "SaveConfig":
            if value.lower() not in ("true", "false"):
                raise self.error(n, f"invalid SaveConfig `{_shown(value)}': expected true or false")
            iface.save_config = value.lower() == "true"
        else:
            getattr(iface, _HOOK_ATTR[key]).append(value)

    def address(self, n: int, tok: str) -> IPInterface:
        addr, slash, plen = tok.partition("/")
        ip = _parse_ip(addr)
        if ip is None:
            raise self.error(n, f"invalid Address `{_shown(tok)}': `{_shown(addr)}' is not an"
                                " IP address")
        if slash and not (_DIGITS.fullmatch(plen) and int(plen) <= ip.max_prefixlen):
            raise self.error(n, f"invalid Address `{_shown(tok)}': prefix length must be"
                                f" 0..{ip.max_prefixlen}")
        return ipaddress.ip_interface((ip, int(plen) if slash else ip.max_prefixlen))

    def dns_entry(self, n: int, tok: str) -> str:
        if _DNS_IS_SERVER.search(tok):
            if _parse_ip(tok, allow_scope=True) is None:
                raise self.error(n, f"invalid DNS server `{_shown(tok)}': not an IP address")
        elif not (_SEARCH_RE.fullmatch(tok) and len(tok) <= 254):
            raise self.error(n, f"invalid DNS search domain `{_shown(tok)}'")
        return tok

    def table(self, n: int, value: str) -> str:
        if value in ("off", "auto") or (_DIGITS.fullmatch(value) and int(value) < 2**32):
            return value
        if _DIGITS.fullmatch(value) or not _TABLE_NAME_RE.fullmatch(value):
            raise self.error(n, f"invalid Table `{_shown(value)}': expected off, auto, a table"
                                " number (0..4294967295) or a table name")
        if value.lower() in ("off", "auto"):
            self.warn(n, f"Table `{value}' is a table name to wg-quick, which compares"
                         f" `{value.lower()}' case-sensitively")
        return value

    # -- wg's keys

    def key(self, n: int, name: str, squashed: str, shown: str | None) -> bytes:
        key = _decode_key(squashed)
        if key is None:
            what = f" `{shown}'" if shown is not None else ""  # never echo a secret
            raise self.error(n, f"{name}{what} is not a key: expected 44 characters of"
                                " base64 encoding 32 bytes, as `wg genkey' prints")
        return key

    def interface_key(self, n: int, key: str, value: str, squashed: str) -> None:
        iface = self.cfg.interface
        if key == "PrivateKey":
            iface.private_key = self.key(n, key, squashed, None)
        elif key == "ListenPort":
            if not _DIGITS.fullmatch(squashed) or int(squashed) > 65535:
                raise self.error(n, f"invalid ListenPort `{_shown(value)}': expected a port number"
                                    " 0..65535")
            iface.listen_port = int(squashed)
        else:
            iface.fwmark = self.fwmark(n, value, squashed)

    def fwmark(self, n: int, value: str, squashed: str) -> int:
        # config.c parse_fwmark: "off", or strtoul base 16 after a lowercase "0x", else 10.
        if squashed.lower() == "off":
            return 0
        if _HEX.fullmatch(squashed) and squashed[1] == "x":
            mark = int(squashed, 16)
        elif _DIGITS.fullmatch(squashed):
            mark = int(squashed)
        else:
            mark = -1
        if not 0 <= mark < 2**32:
            raise self.error(n, f"invalid FwMark `{_shown(value)}': expected off, 0..4294967295"
                                " or 0x0..0xffffffff")
        return mark

    def peer_key(self, n: int, key: str, value: str, squashed: str) -> None:
        peer = self.peer
        assert peer is not None
        if key == "PublicKey":
            pub = self.key(n, key, squashed, squashed)
            if is_low_order(pub):
                raise self.error(n, f"PublicKey `{squashed}' is a low-order Curve25519 point;"
                                    " a handshake with it cannot be secure")
            for other in self.cfg.peers:
                if other is not peer and other.public_key == pub:
                    raise self.error(n, f"duplicate peer: PublicKey `{squashed}' is already"
                                        f" used at line {other.lines['PublicKey']}")
            peer.public_key = pub
        elif key == "PresharedKey":
            peer.preshared_key = self.key(n, key, squashed, None)
        elif key == "AllowedIPs":
            items = value.split(",")
            for i, entry in enumerate(squashed.split(",")):
                peer.allowed_ips.append(self.allowed_ip(n, entry, items[i].strip(_WS)))
        elif key == "Endpoint":
            peer.endpoint = self.endpoint(n, value, squashed)
        else:
            if squashed.lower() == "off":
                peer.persistent_keepalive = 0
            elif _DIGITS.fullmatch(squashed) and int(squashed) <= 65535:
                peer.persistent_keepalive = int(squashed)
            else:
                raise self.error(n, f"invalid PersistentKeepalive `{_shown(value)}': expected off"
                                    " or 0..65535")

    def allowed_ip(self, n: int, entry: str, written: str) -> IPNetwork:
        """One AllowedIPs entry, as config.c parse_allowedips reads it."""

        def bad(why: str) -> ConfigError:
            return self.error(n, f"invalid AllowedIPs entry `{_shown(entry)}': {why}")

        if not entry:
            raise bad("empty entry between commas")
        if entry[0] in "+-":
            raise bad("incremental +/- entries are for `wg set', not config files")
        addr, slash, plen = entry.partition("/")
        ip = _parse_ip(addr)
        if ip is None or (slash and not _DIGITS.fullmatch(plen)):
            if any(c in _WS for c in written):
                raise bad("entries must be separated by commas")
            if ip is None:
                raise bad(f"`{_shown(addr)}' is not an IP address")
        if slash and not (_DIGITS.fullmatch(plen) and int(plen) <= ip.max_prefixlen):
            raise bad(f"prefix length must be 0..{ip.max_prefixlen}")
        net = ipaddress.ip_network((ip, int(plen) if slash else ip.max_prefixlen), strict=False)
        if net.network_address != ip:
            # wg (newer versions) warns; the kernel ignores the host part.
            self.warn(n, f"AllowedIPs `{entry}' has host bits set; it means {net}")
        return net

    def endpoint(self, n: int, value: str, squashed: str) -> Endpoint:
        """Endpoint as config.c parse_endpoint splits it, without resolving names."""

        def bad(why: str) -> ConfigError:
            return self.error(n, f"invalid Endpoint `{_shown(value)}': {why}")

        if squashed.startswith("["):
            close = squashed.find("]")
            if close < 0:
                raise bad("no closing `]'")
            host, rest = squashed[1:close], squashed[close + 1:]
            if not rest.startswith(":") or len(rest) == 1:
                raise bad("missing port (expected [IPv6]:port)")
            port = rest[1:]
            ip = _parse_ip(host, allow_scope=True)
            if ip is None or ip.version != 6:
                raise bad("brackets must hold an IPv6 address")
        else:
            host, colon, port = squashed.rpartition(":")
            if not colon or not port:
                raise bad("missing port (expected host:port, IPv4:port or [IPv6]:port)")
            if ":" in host:
                raise bad("an IPv6 address needs brackets, as in [2001:db8::1]:51820")
            ip = _parse_ip(host)
            if ip is None and (re.fullmatch(r"[0-9.]*", host) or len(host.rstrip(".")) > 253
                               or not _HOSTNAME_RE.fullmatch(host)):
                raise bad(f"`{_shown(host)}' is neither an IP address nor a hostname")
        if not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise bad("port must be 1..65535")
        return Endpoint(str(ip) if ip is not None else host, int(port))

    # -- whole-file checks

    def finish(self) -> None:
        iface = self.cfg.interface
        if iface.mtu is not None and iface.mtu < MTU_MIN_IPV6:
            v6 = next((a for a in iface.addresses if a.version == 6), None)
            if v6 is not None:
                raise self.error(iface.lines["MTU"], f"MTU {iface.mtu} is below {MTU_MIN_IPV6},"
                                 f" the IPv6 minimum, but Address {v6} is IPv6")
        owner: dict[IPNetwork, PeerConfig] = {}
        for peer in self.cfg.peers:
            for net in dict.fromkeys(peer.allowed_ips):
                first = owner.setdefault(net, peer)
                if first is not peer:
                    self.warn(peer.line or 0, f"AllowedIPs {net} of this peer is also in the"
                              f" peer at line {first.line}; wg gives it to the last one")
                    owner[net] = peer


def loads(text: str, path: str | os.PathLike[str] = "<string>") -> Config:
    """Parse config text; ``path`` only labels messages. Raises ConfigError."""
    return _Parser(os.fspath(path)).parse(text)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse a file. A file that cannot be read is a ConfigError at line 0."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise ConfigError(name, 0, f"cannot read file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, data[:e.start].count(b"\n") + 1, "not valid UTF-8") from None
    return loads(text, name)


def validate_for_up(config: Config) -> None:
    """Checks `wg-quick up` needs beyond parsing: a usable PrivateKey, and no peer with the
    interface's own public key (the kernel would silently drop it). Raises ConfigError."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    iface = config.interface
    key = iface.private_key
    if key is None:
        raise ConfigError(config.path, iface.line or 0, "[Interface] has no PrivateKey")
    line = iface.lines.get("PrivateKey", iface.line or 0)
    if key == bytes(32):
        raise ConfigError(config.path, line, "PrivateKey is all zeros, which wg takes as"
                          " `no private key'")
    own = X25519PrivateKey.from_private_bytes(key).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    for peer in config.peers:
        if peer.public_key == own:
            raise ConfigError(config.path, peer.lines.get("PublicKey", peer.line or 0),
                              "peer has this interface's own public key")


# ---------------------------------------------------------------------------- writing

def _render(config: Config, full: bool) -> str:
    iface = config.interface
    out = ["[Interface]"]
    if iface.private_key is not None:
        out.append(f"PrivateKey = {_b64(iface.private_key)}")
    if iface.listen_port is not None:
        out.append(f"ListenPort = {iface.listen_port}")
    if iface.fwmark is not None:
        out.append(f"FwMark = {f'0x{iface.fwmark:x}' if iface.fwmark else 'off'}")
    if full:
        if iface.addresses:
            out.append(f"Address = {', '.join(str(a) for a in iface.addresses)}")
        if iface.dns:
            out.append(f"DNS = {', '.join(iface.dns)}")
        if iface.mtu is not None:
            out.append(f"MTU = {iface.mtu}")
        if iface.table is not None:
            out.append(f"Table = {iface.table}")
        if iface.save_config:
            out.append("SaveConfig = true")
        for key, attr in _HOOK_ATTR.items():
            for hook in getattr(iface, attr):
                if hook != hook.strip(_WS) or "\n" in hook or "\r" in hook:
                    raise ValueError(f"{key} hook {hook!r} has surrounding whitespace or a"
                                     " line break; it cannot be written to a config file")
                out.append(f"{key} = {hook}")
    for peer in config.peers:
        out += ["", "[Peer]", f"PublicKey = {_b64(peer.public_key)}"]
        if peer.preshared_key is not None:
            out.append(f"PresharedKey = {_b64(peer.preshared_key)}")
        if peer.allowed_ips:
            out.append(f"AllowedIPs = {', '.join(str(n) for n in peer.allowed_ips)}")
        if peer.endpoint is not None:
            out.append(f"Endpoint = {Endpoint(*peer.endpoint)}")
        if peer.persistent_keepalive is not None:
            out.append(f"PersistentKeepalive = {peer.persistent_keepalive or 'off'}")
    return "\n".join(out) + "\n"


def _checked(config: Config, expected: Config, text: str) -> str:
    try:
        again = loads(text, config.path)
    except ConfigError as e:
        raise ValueError(f"config cannot be written: {e.message}") from None
    if again != expected:
        raise ValueError("config cannot be written faithfully (a value outside what"
                         " the file format can express?)")
    return text


def dumps(config: Config) -> str:
    """Render a file that `loads` parses back to an equal Config and whose wg part
    `wg setconf` accepts. Raises ValueError for a Config no file can express."""
    return _checked(config, config, _render(config, full=True))


def wg_setconf_text(config: Config) -> str:
    """Only what `wg setconf` understands (PrivateKey, ListenPort, FwMark; PublicKey,
    PresharedKey, AllowedIPs, Endpoint, PersistentKeepalive): `wg-quick strip`."""
    iface = config.interface
    wg_only = replace(config, interface=InterfaceConfig(
        private_key=iface.private_key, listen_port=iface.listen_port, fwmark=iface.fwmark))
    return _checked(config, wg_only, _render(config, full=False))


# ---------------------------------------------------------------------- names and files

def interface_name(path: str | os.PathLike[str]) -> str:
    """The interface a config file configures: its basename without ``.conf``; wg-quick's
    rule ``(^|/)([a-zA-Z0-9_=+.-]{1,15})\\.conf$``. Raises ConfigError (line 0)."""
    name = os.fspath(path)
    match = _CONF_RE.search(name)
    if match is None:
        raise ConfigError(name, 0, "the config file must be a valid interface name"
                                   " (1-15 of a-z A-Z 0-9 _ = + . -), followed by .conf")
    return match.group(1)


def resolve(name_or_path: str | os.PathLike[str], config_dir: str = CONFIG_DIR) -> Path:
    """The config file `wgx up ARG` / `wgx down ARG` reads.

    * ARG ending in ``.conf`` that exists (relative to the current directory) is that
      file, even when it is also a valid interface name: ``wgx up wg0.conf`` next to
      ``wg0.conf`` reads it. (wg-quick would read ``config_dir/wg0.conf.conf``.)
    * Otherwise, as wg-quick: a valid interface name means ``config_dir/NAME.conf``;
      anything else is a path.

    Raises ConfigError (``ARG:0``) for a bare ARG ending in ``.conf`` (a valid interface
    name) that is neither a file nor, as an interface name, ``config_dir/ARG.conf``,
    instead of blaming a ``.conf.conf`` file nobody asked for. Looks at the file system
    only; a missing path is left for `load` to report.
    """
    name = os.fspath(name_or_path)
    if name.endswith(".conf") and os.path.exists(name):
        return Path(name)
    if _IFACE_RE.fullmatch(name):
        as_iface = Path(config_dir) / f"{name}.conf"
        if name.endswith(".conf") and not os.path.exists(as_iface):
            raise ConfigError(name, 0, "no such file (and, read as an interface name as"
                                       f" wg-quick would, no {as_iface} either)")
        return as_iface
    return Path(name)


def permission_warning(path: str | os.PathLike[str]) -> str | None:
    """A warning if group or others can read or write the file (after resolving links)
    and can also search its directory, else None. Like wg-quick, only the file and its
    own directory are looked at. OSError from stat() propagates."""
    real = os.path.realpath(path)
    mode = os.stat(real).st_mode
    dmode = os.stat(os.path.dirname(real)).st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH) and dmode & stat.S_IXOTH:
        return f"Warning: `{real}' is world accessible"
    if mode & (stat.S_IRGRP | stat.S_IWGRP) and dmode & stat.S_IXGRP:
        return f"Warning: `{real}' is accessible to its group"
    return None


def hooks(config: Config, stage: HookStage | str, iface: str) -> list[str]:
    """The hook commands of ``stage`` (pre_up/post_up/pre_down/post_down, or PreUp...)
    with every ``%i`` replaced by ``iface``, as wg-quick's execute_hooks does. ``iface``
    must be a valid interface name, so substitution cannot inject shell syntax."""
    attr = _HOOK_ATTR.get(stage, stage) if isinstance(stage, str) else stage
    if attr not in _HOOK_ATTR.values():
        raise ValueError(f"unknown hook stage {stage!r}")
    if not _IFACE_RE.fullmatch(iface):
        raise ValueError(f"invalid interface name {iface!r}")
    return [h.replace("%i", iface) for h in getattr(config.interface, attr)]
