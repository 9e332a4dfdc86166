"""keyguard: fail the pytest session if a secret key the suite used shows up in its output.

Issue 6 item 7: private keys never appear in logs, `show` or exceptions.  This
plugin checks that for the whole test suite at once.

Registry (every secret the suite used, as 32 raw bytes), filled from:
- in-process key handling of wgx: ``crypto.generate_private_key`` results,
  ``crypto.public_key`` arguments (every private key whose public key is derived:
  engines, configs, tests), the interface private key and peer preshared keys of
  every ``config.loads`` result, UAPI ``parse_set`` results and
  ``UapiClient.set`` request bodies;
- ``subprocess.run`` of a ``genkey``/``genpsk`` command (``wg``/``wgx``, also
  netlab's keys): its stdout and a FILE argument it wrote;
- files: ``*.conf`` (PrivateKey/PresharedKey lines), ``*.key``/``*psk*`` files
  (not ``*pub*``), UAPI ``private_key=``/``preshared_key=`` lines, found in the
  session's tmp_path tree and in each netlab lab directory before it is removed.

Output scanned: every test report (captured stdout/stderr/log of all phases
and the failure text, ``longrepr``), every ``*.log`` file in those trees (the
daemon logs netlab writes).  A key counts as present in base64 (44 chars with
``=``) or hex (64 digits, either case, at any offset of a longer hex run).

Keys with fewer than 16 distinct byte values (all-zero "clear the key",
``bytes([1]) * 32`` fixtures, low-order points) are not secrets and ignored:
32 random bytes have about 30 distinct values.

At session end a finding fails the session (exit status 1) and names the test
(or log file) and the form, never the key.  Output not captured by pytest
(``-s``) cannot be checked; the summary says so.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

MIN_DISTINCT = 16
MAX_FILE = 4 << 20  # bytes of one file read for keys or scanned as a log

_B64_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
_HEX_RE = re.compile(r"[0-9a-fA-F]{64,}")
_FILE_KEY_RE = re.compile(
    r"(?im)^\s*(?:PrivateKey|PresharedKey)\s*=\s*([A-Za-z0-9+/]{43}=)"
    r"|^\s*(?:private_key|preshared_key)=([0-9a-fA-F]{64})\s*$")

SECRETS: set[bytes] = set()
# candidate 32-byte value -> {(where, form)}: everything key-shaped seen in output
SEEN: dict[bytes, set[tuple[str, str]]] = {}
_current = ["(outside a test)"]
_findings: list[str] = []
_installed: list[Any] = []


# ----------------------------------------------------------------- registry


def register(key: bytes | str | None) -> None:
    """Add a secret: 32 raw bytes, or its base64 / hex text (anything else is ignored)."""
    if key is None:
        return
    raw: bytes | None = None
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    else:
        text = key.strip()
        try:
            raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            return
    if len(raw) == 32 and len(set(raw)) >= MIN_DISTINCT:
        SECRETS.add(raw)


def register_text(text: str) -> None:
    """Secrets in config/UAPI text: PrivateKey/PresharedKey = b64, private_key/preshared_key=hex."""
    for m in _FILE_KEY_RE.finditer(text):
        register(m.group(1) or m.group(2))


def _read(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def register_file(path: Path) -> None:
    name = path.name.lower()
    if "pub" in name:
        return
    text = _read(path)
    if text is None:
        return
    register_text(text)
    if name.endswith(".key") or "psk" in name or "priv" in name:
        register(text.strip())


# ----------------------------------------------------------------- scanning


def candidates(text: str) -> Iterable[tuple[bytes, str]]:
    """Every 32-byte value written in `text` as base64 or hex: (value, form)."""
    for m in _B64_RE.finditer(text):
        yield base64.b64decode(m.group()), "base64"
    for m in _HEX_RE.finditer(text):
        run = m.group()
        for i in range(len(run) - 63):
            yield bytes.fromhex(run[i:i + 64]), "hex"


def scan(text: str, secrets: set[bytes]) -> list[str]:
    """The forms (base64/hex) in which any of `secrets` occurs in `text`."""
    return sorted({form for value, form in candidates(text) if value in secrets})


def observe(where: str, text: str) -> None:
    """Remember every key-shaped value in `text` (checked against SECRETS at the end)."""
    if not text:
        return
    for value, form in candidates(text):
        SEEN.setdefault(value, set()).add((where, form))


def observe_tree(root: Path | str, label: str | None = None) -> None:
    """Register the secrets in a test directory's key/config files; observe its logs.

    Findings in a log are reported as `label` (default: the running test) plus
    the log's path below `root`.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = Path(dirpath) / f
            if f.endswith(".log"):
                if (text := _read(path)) is not None:
                    rel = path.relative_to(root)
                    observe(f"{label or _current[0]} (log file {rel})", text)
            elif f.endswith((".conf", ".key")) or "psk" in f or "priv" in f:
                register_file(path)


def findings() -> list[str]:
    """Where a registered secret was seen: 'where: form', sorted (no key material)."""
    hits = {f"{where} [{form}]" for value, places in SEEN.items() if value in SECRETS
            for where, form in places}
    return sorted(hits)


# ------------------------------------------------------------ instrumentation


def _wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    wrapper = functools.wraps(original)(make(original))
    setattr(owner, name, wrapper)
    _installed.append((owner, name, original))
    # modules that did `from ... import name` before us
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("wgx.") and \
                getattr(mod, name, None) is original:
            setattr(mod, name, wrapper)
            _installed.append((mod, name, original))


def install() -> None:
    """Hook the places where secrets enter the suite (idempotent)."""
    if _installed:
        return
    from wgx.control import config, uapi, uapi_client
    from wgx.protocol import crypto

    def gen(orig: Callable) -> Callable:
        def f(*a: Any, **kw: Any) -> Any:
            key = orig(*a, **kw)
            register(key)
            return key
        return f

    def pub(orig: Callable) -> Callable:
        def f(private: bytes, *a: Any, **kw: Any) -> Any:
            register(private)
            return orig(private, *a, **kw)
        return f

    def loads(orig: Callable) -> Callable:
        def f(*a: Any, **kw: Any) -> Any:
            conf = orig(*a, **kw)
            register(conf.interface.private_key)
            for p in conf.peers:
                register(p.preshared_key)
            return conf
        return f

    def parse_set(orig: Callable) -> Callable:
        def f(*a: Any, **kw: Any) -> Any:
            change = orig(*a, **kw)
            if isinstance(change.private_key, bytes):
                register(change.private_key)
            for p in change.peers:
                register(p.preshared_key)
            return change
        return f

    def client_set(orig: Callable) -> Callable:
        def f(self: Any, body: str, *a: Any, **kw: Any) -> Any:
            register_text(body)
            return orig(self, body, *a, **kw)
        return f

    def run(orig: Callable) -> Callable:
        def f(*a: Any, **kw: Any) -> Any:
            cp = orig(*a, **kw)
            argv = a[0] if a else kw.get("args")
            if isinstance(argv, (list, tuple)) and any(x in ("genkey", "genpsk") for x in argv):
                out = cp.stdout
                if isinstance(out, bytes):
                    out = out.decode(errors="replace")
                if isinstance(out, str):
                    register(out.strip())
                for x in argv[argv.index("genkey" if "genkey" in argv else "genpsk") + 1:]:
                    register_file(Path(str(x)))
            return cp
        return f

    _wrap(crypto, "generate_private_key", gen)
    _wrap(crypto, "public_key", pub)
    _wrap(config, "loads", loads)
    _wrap(uapi, "parse_set", parse_set)
    _wrap(uapi_client.UapiClient, "set", client_set)
    _wrap(subprocess, "run", run)


# ------------------------------------------------------------------ pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current[0] = item.nodeid
    yield
    _current[0] = "(outside a test)"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for title, content in report.sections:
        observe(f"{report.nodeid} ({title})", content)
    if report.longrepr is not None:
        observe(f"{report.nodeid} ({report.when} failure text)", report.longreprtext)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.longrepr is not None:
        observe(f"{report.nodeid or '(collection)'} (collection error)", report.longreprtext)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    if base is not None:
        observe_tree(base, "tmp_path")
    _findings[:] = findings()
    if _findings and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    tr = terminalreporter
    if _findings:
        tr.section("keyguard: secret keys in test output", sep="=", red=True, bold=True)
        for line in _findings:
            tr.write_line(f"  a secret key used by the suite appears in {line}")
        tr.write_line(f"keyguard: FAILED ({len(_findings)} places; keys are not shown)")
    elif config.getoption("capture", "fd") == "no":
        tr.write_line(f"keyguard: {len(SECRETS)} keys registered; output not captured (-s), "
                      "only log files were checked")
    else:
        tr.write_line(f"keyguard: {len(SECRETS)} secret keys registered, none in the output")
