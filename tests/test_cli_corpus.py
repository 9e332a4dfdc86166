"""`wgx up` on a corpus of broken configs: one clear error line, nothing left behind.

Each file in tests/configs/broken/ holds one mistake and says on its first line
what wgx must answer (see the README there)::

    # expect: LINE: substring of the message

Keys are placeholders (@PRIV@, @OWNPUB@, @PUB@, @PSK@) replaced with real keys
from `wgx genkey`/`wgx pubkey`/`wgx genpsk`, so the only key errors are the
intended ones. Every case runs `wgx up FILE --netns NS` in one shared lab and
checks: exit code 2, exactly one stderr line `error: FILE:LINE: message`, no
secret echoed, and no trace in the namespace (links, addresses, routes, rules,
UAPI socket, state file, processes) compared with a snapshot taken before.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest

from wgx.control.netconf import NetConf

pytestmark = pytest.mark.privileged

CORPUS = Path(__file__).parent / "configs" / "broken"
_UAPI_SH = 'mount --bind "$0" /run/wireguard && exec "$@"'
_EXPECT = re.compile(r"# expect: (\d+): (.+)")
_XFAIL = re.compile(r"# xfail: (.+)")
_NAME = re.compile(r"(\d{2})-[a-z0-9-]+\.conf")
IFA_F_TENTATIVE = 0x40


def _case(path: Path) -> Any:
    m = _NAME.fullmatch(path.name)
    assert m, f"corpus file {path.name} is not named NN-short-name.conf"
    lines = path.read_bytes().decode("utf-8", "replace").split("\n")
    exp = _EXPECT.fullmatch(lines[0])
    assert exp, f"{path.name}: the first line must be `# expect: LINE: text'"
    xf = _XFAIL.fullmatch(lines[1]) if len(lines) > 1 else None
    marks = [pytest.mark.xfail(reason=f"wgx bug: {xf.group(1)}", strict=True)] if xf else []
    return pytest.param(path, int(exp.group(1)), exp.group(2), id=path.stem, marks=marks)


CASES = [_case(p) for p in sorted(CORPUS.glob("*.conf"))]


def test_corpus_is_big_and_distinct() -> None:
    assert len(CASES) >= 24
    numbers = [p.name[:2] for p in CORPUS.glob("*.conf")]
    assert len(numbers) == len(set(numbers)), "two corpus files share a number"
    bodies = [p.read_bytes().split(b"\n", 1)[1] for p in CORPUS.glob("*.conf")]
    assert len(bodies) == len(set(bodies)), "two corpus files hold the same config"


# ------------------------------------------------------------------------- helpers


def _wgx(h: netlab.Host, *args: str) -> subprocess.CompletedProcess:
    """`wgx ARGS --netns NS` from the root netns with h's private UAPI directory."""
    netlab._ensure_run_wireguard()
    argv = ["unshare", "-m", "sh", "-c", _UAPI_SH, str(h.uapi_dir), "wgx", *args,
            "--netns", h.name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _out(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def _settled(netns: str) -> bool:
    """No IPv6 address still doing DAD (its local route would appear later)."""
    with NetConf(netns) as nc:
        return not any((m.get_attr("IFA_FLAGS") or m["flags"]) & IFA_F_TENTATIVE
                       for m in nc.ipr.get_addr(family=10))


def _processes_naming(word: str) -> list[str]:
    """Command lines of live processes that mention `word` (e.g. a stray daemon)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(word.encode() in a for a in argv):
            found.append(f"{entry}: {b' '.join(argv).decode(errors='replace')}")
    return found


# ------------------------------------------------------------------------ fixtures


class Corpus:
    def __init__(self, lab: netlab.Lab) -> None:
        self.lab = lab
        self.host = lab.a
        priv = _out("wgx", "genkey")
        other = _out("wgx", "genkey")
        self.subst = {
            "@PRIV@": priv,
            "@OWNPUB@": _out("wgx", "pubkey", stdin=priv),
            "@PUB@": _out("wgx", "pubkey", stdin=other),
            "@PSK@": _out("wgx", "genpsk"),
        }
        self.secrets = [self.subst["@PRIV@"], self.subst["@PSK@"]]
        netlab.wait_until(lambda: _settled(self.host.name), timeout=10, what="IPv6 DAD")
        self.baseline = netlab.snapshot(self.host.name)

    def render(self, src: Path, dst: Path) -> None:
        data = src.read_bytes()
        for k, v in self.subst.items():
            data = data.replace(k.encode(), v.encode())
        data = data.replace(b"@XFF@", b"\xff")
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(dst, 0o600)  # no permission warning on stderr

    def expand(self, text: str) -> str:
        for k, v in self.subst.items():
            text = text.replace(k, v)
        return text


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with netlab.Lab() as lab:
        yield Corpus(lab)
        # wgx leaves an empty /run/wgx/NETNS behind (see test_down_removes_state_directory)
        for h in lab.hosts.values():
            with contextlib.suppress(OSError):
                os.rmdir(f"/run/wgx/{h.name}")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("src,line,message", CASES)
def test_broken_config(corpus: Corpus, src: Path, line: int, message: str) -> None:
    h = corpus.host
    iface = f"wgbad{src.name[:2]}"
    conf = h.dir / f"{iface}.conf"
    corpus.render(src, conf)
    try:
        cp = _wgx(h, "up", str(conf))
        shown = cp.stdout + cp.stderr
        leaked = [s for s in corpus.secrets if s[:16] in shown]  # not even a part of it
        for s in leaked:
            shown = shown.replace(s[:43], "<SECRET>")
        if leaked:
            pytest.fail(f"a secret key is echoed in the output: {shown!r}", pytrace=False)
        assert cp.returncode == 2, (cp.returncode, cp.stderr)
        assert cp.stdout == ""
        lines = cp.stderr.splitlines()
        assert len(lines) == 1, f"expected one stderr line, got {lines}"
        m = re.fullmatch(rf"error: {re.escape(str(conf))}:(\d+): (.+)", lines[0])
        assert m, f"not `error: PATH:LINE: message': {lines[0]!r}"
        assert int(m.group(1)) == line, f"wrong line: {lines[0]!r}"
        assert corpus.expand(message) in m.group(2), lines[0]
    finally:
        leftovers = _leftovers(corpus, iface)
        conf.unlink(missing_ok=True)
    assert not leftovers, leftovers


@pytest.mark.parametrize("command", ["up", "down"])
def test_file_name_not_an_interface_name(corpus: Corpus, command: str) -> None:
    """wg-quick's rule: the file name (without .conf) is the interface name, 1-15 chars."""
    h = corpus.host
    conf = h.dir / "name-longer-than-15.conf"
    conf.write_text(corpus.expand("[Interface]\nPrivateKey = @PRIV@\n"))
    os.chmod(conf, 0o600)
    try:
        cp = _wgx(h, command, str(conf))
        lines = cp.stderr.splitlines()
        assert cp.returncode == 2, (cp.returncode, cp.stderr[-300:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {conf}:0: the config file"
                                                       " must be a valid interface name")
    finally:
        conf.unlink()
    assert not _leftovers(corpus, "name-longer-than-15")


def test_leftover_check_sees_a_live_interface(corpus: Corpus) -> None:
    """The checks above are not vacuous: a config that does come up is seen by all of
    them, and `wgx down` brings the namespace back to the snapshot."""
    h = corpus.host
    iface = "wgbadok"
    conf = h.dir / f"{iface}.conf"
    conf.write_text(corpus.expand(
        "[Interface]\nPrivateKey = @PRIV@\nAddress = 10.99.0.1/24, fd99::1/64\n"
        "[Peer]\nPublicKey = @PUB@\nEndpoint = 198.18.0.2:51821\n"
        "AllowedIPs = 10.99.0.2/32, 0.0.0.0/0\n"))
    os.chmod(conf, 0o600)
    try:
        cp = _wgx(h, "up", str(conf))
        assert cp.returncode == 0, cp.stderr
        seen = "\n".join(_leftovers(corpus, iface))
        for what in (f"link {iface} in", "links changed", "addresses changed",
                     "routes changed", "rules changed", "private UAPI dir",
                     "state file", "processes in", "wgx-userspace"):
            assert what in seen, f"{what!r} not detected in:\n{seen}"
    finally:
        cp = _wgx(h, "down", str(conf))
    assert cp.returncode == 0, cp.stderr
    netlab.wait_until(lambda: not _leftovers(corpus, iface), timeout=5,
                      what=f"{iface} gone")
    conf.unlink()


def test_down_removes_state_directory(corpus: Corpus) -> None:
    h = corpus.host
    conf = h.dir / "wgbadstate.conf"
    conf.write_text(corpus.expand("[Interface]\nPrivateKey = @PRIV@\nAddress = 10.99.0.1/24\n"))
    os.chmod(conf, 0o600)
    with contextlib.suppress(OSError):
        os.rmdir(f"/run/wgx/{h.name}")  # start without it
    try:
        cp = _wgx(h, "up", str(conf))
        assert cp.returncode == 0, cp.stderr
        assert Path(f"/run/wgx/{h.name}/wgbadstate.json").exists()
    finally:
        cp = _wgx(h, "down", str(conf))
        conf.unlink()
    assert cp.returncode == 0, cp.stderr
    assert not _leftovers(corpus, "wgbadstate")
    assert not Path(f"/run/wgx/{h.name}").exists(), "empty state directory left behind"


def _leftovers(corpus: Corpus, iface: str) -> list[str]:
    """Everything `wgx up` of a refused config may have left behind (must be empty)."""
    h = corpus.host
    found = []
    with NetConf(h.name) as nc:
        if nc.link_index(iface) is not None:
            found.append(f"link {iface} in {h.name}")
    with NetConf() as nc:  # read-only look: it must not have landed in the root netns
        if nc.link_index(iface) is not None:
            found.append(f"link {iface} in the root namespace")
    now = netlab.snapshot(h.name)
    for key, before in corpus.baseline.items():
        if now[key] != before:
            found.append(f"{key} changed: {before} -> {now[key]}")
    if entries := sorted(os.listdir(h.uapi_dir)):
        found.append(f"files in the private UAPI dir: {entries}")
    if Path(netlab.RUN_WG, f"{iface}.sock").exists():
        found.append(f"{netlab.RUN_WG}/{iface}.sock in the root mount namespace")
    for state in (Path(f"/run/wgx/{h.name}/{iface}.json"), Path(f"/run/wgx/{iface}.json")):
        if state.exists():
            found.append(f"state file {state}")
    assert h.inode is not None
    if pids := netlab._pids_in_netns(h.inode):
        found.append(f"processes in {h.name}: {[_cmdline(p) for p in pids]}")
    found += _processes_naming(iface)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"
