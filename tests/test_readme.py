"""What the README promises, run as written (issue 15).

* The worked example ("Provisioning: a worked example") is taken verbatim from
  README.md and run by bash (``-e``: any failing command fails the test) in a fresh
  directory, with the venv's console scripts on PATH, on the two hosts it describes:
  network namespaces ``alpha`` and ``beta`` joined by a veth with 198.18.0.1/24 and
  198.18.0.2/24, created here and always removed. Those names are fixed by the
  README, so the test refuses to run if such namespaces already exist. The script runs
  in a private mount namespace with a private /run/wireguard (netlab's bind mount), so
  its UAPI sockets never meet the host's.
* ``LOG_LEVEL=verbose`` shows wgx's own messages, not pyroute2's netlink dumps;
  ``WGX_LOG_DEBUG`` asks for a library's debug messages by logger name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from test_cli_tunnel import OV4, wgx, wgx_ok, write_conf

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Provisioning: a worked example"
HOSTS = {"alpha": "198.18.0.1/24", "beta": "198.18.0.2/24"}  # the README's two hosts
UNDERLAY_IF = "ul0"
# wgx-userspace's log format: "%(asctime)s %(name)s: %(message)s"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\S+): ", re.MULTILINE)
# Settings a developer's shell may carry that would change what the example does.
_FOREIGN_ENV = ("LOG_LEVEL", "WG_PROCESS_FOREGROUND")


# ------------------------------------------------------------------------- helpers


def worked_example(readme: Path = README) -> str:
    """The ```sh block right after the heading, verbatim (AssertionError if there is none)."""
    lines = readme.read_text().split("\n")
    assert HEADING in lines, f"{readme}: no heading {HEADING!r}"
    rest = lines[lines.index(HEADING) + 1:]
    start = next((i for i, line in enumerate(rest) if line.startswith(("```", "## "))), None)
    assert start is not None and rest[start] == "```sh", \
        f"{readme}: the first block after {HEADING!r} is not a ```sh block"
    end = rest.index("```", start + 1)
    return "\n".join(rest[start + 1:end]) + "\n"


@contextlib.contextmanager
def readme_hosts(workdir: Path) -> Iterator[dict[str, netlab.Host]]:
    """Namespaces alpha and beta joined by a veth (198.18.0.1/24, 198.18.0.2/24).

    Fails without touching anything if a namespace of either name exists; on exit kills
    what runs in the namespaces this created (only those, by inode) and deletes them.
    """
    taken = [name for name in HOSTS if netlab._ns_inode(name) is not None]
    if taken:
        pytest.fail(f"network namespace(s) {', '.join(taken)} already exist and were not "
                    "created by this test; the README's example needs these names, so "
                    "remove them (ip netns del NAME) or run the test elsewhere", pytrace=False)
    hosts: dict[str, netlab.Host] = {}
    try:
        for name in HOSTS:
            h = netlab.Host(name, workdir)
            h.name = name  # the README's name instead of a random one
            hosts[name] = h  # before create(): close() knows whether it created it
            h.create()
        netlab._run(["ip", "-n", "alpha", "link", "add", UNDERLAY_IF, "type", "veth",
                     "peer", "name", UNDERLAY_IF, "netns", "beta"])
        for name, h in hosts.items():
            h.addr_add(UNDERLAY_IF, HOSTS[name])
            h.link_up(UNDERLAY_IF, mtu=1500)
        yield hosts
    finally:
        errors = []
        for h in hosts.values():
            try:
                h.close()
            except netlab.NetlabError as e:
                errors.append(str(e))
        assert not errors, errors


def private_uapi(uapi_dir: Path, cmd: list[str]) -> list[str]:
    """`cmd` in the root netns with `uapi_dir` bind-mounted over /run/wireguard."""
    return ["unshare", "-m", "sh", "-c", netlab._UAPI_SH, str(uapi_dir), *cmd]


def newcomer_env() -> dict[str, str]:
    """This environment without wgx settings a developer's shell may carry, and with the
    venv's console scripts (wgx, wgx-userspace) first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV
           and not k.startswith("WGX_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_script(script: str, cwd: Path, uapi_dir: Path,
               timeout: float = 200) -> subprocess.CompletedProcess:
    """`bash -e -x` on the script text in `cwd` (see newcomer_env).

    -e: the first failing command ends the script with its status; -x: stderr shows
    every command as it runs (command substitutions included, not their output)."""
    path = cwd.parent / "worked-example.sh"
    path.write_text(script)
    p = subprocess.Popen(private_uapi(uapi_dir, ["bash", "-e", "-x", str(path)]), cwd=cwd,
                         env=newcomer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        err += f"\n(killed after {timeout}s)"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def take_down(cwd: Path, uapi_dir: Path) -> tuple[list[str], str]:
    """`wgx down` every interface the example left up, then remove what `wgx up` keeps
    under /run/wgx for the example's namespaces. Returns the errors and the daemon logs
    found there (for a failure message)."""
    errors, logs = [], []
    for name in HOSTS:
        state = Path(f"/run/wgx/{name}/wg-{name}.json")
        if state.exists():  # else not up: the example took it down, or never got that far
            cp = subprocess.run(private_uapi(uapi_dir, ["wgx", "down", f"wg-{name}.conf",
                                                        "--netns", name]),
                                cwd=cwd, env=newcomer_env(), capture_output=True, text=True,
                                timeout=60)
            if cp.returncode:
                errors.append(f"wgx down wg-{name}.conf: {cp.stderr.strip()}")
        log = state.with_suffix(".log")  # the daemon's log, if this wgx keeps one
        with contextlib.suppress(OSError):
            logs.append(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}")
            log.unlink()
        with contextlib.suppress(OSError):
            state.parent.rmdir()  # only if empty
    return errors, "\n".join(logs)


def run_worked_example(script: str, tmp: Path) -> subprocess.CompletedProcess:
    """The example on fresh hosts alpha and beta; always taken down and removed after.
    The daemon logs are appended to the returned stderr."""
    cwd, uapi_dir = tmp / "example", tmp / "uapi"
    cwd.mkdir()
    uapi_dir.mkdir(mode=0o755)
    (tmp / "hosts").mkdir()
    netlab._acquire_run_wireguard()  # the mountpoint; removed after if netlab made it
    try:
        with readme_hosts(tmp / "hosts"):
            try:
                cp = run_script(script, cwd, uapi_dir)
            finally:
                leftover, logs = take_down(cwd, uapi_dir)
    finally:
        netlab._release_run_wireguard()
    assert not leftover, leftover
    cp.stderr += f"\n{logs}" if logs else ""
    return cp


# --------------------------------------------------------------------------- tests


def test_worked_example_is_extracted(tmp_path: Path) -> None:
    script = worked_example()
    assert script.startswith("wgx genkey") and "cat > wg-alpha.conf <<CONF\n" in script
    assert "wgx up wg-alpha.conf --netns alpha" in script
    assert "ip netns exec alpha ping" in script
    fake = tmp_path / "README.md"
    fake.write_text(f"{HEADING}\n\ntext\n\n## Next\n\n```sh\ntrue\n```\n")
    with pytest.raises(AssertionError, match="not a ```sh block"):
        worked_example(fake)
    fake.write_text(f"{HEADING}\n\ntext\n\n```sh\na\n\nb <<X\nc\nX\n```\n\n```sh\nd\n```\n")
    assert worked_example(fake) == "a\n\nb <<X\nc\nX\n"


@pytest.mark.privileged
def test_readme_worked_example_runs_as_written(tmp_path: Path) -> None:
    cp = run_worked_example(worked_example(), tmp_path)
    assert cp.returncode == 0, (f"the README's worked example failed (rc={cp.returncode})"
                                f"\n--- stdout\n{cp.stdout}\n--- stderr (bash -x, then the "
                                f"daemon logs)\n{cp.stderr}")
    pings = re.findall(r"^(\d+) packets transmitted, (\d+) received", cp.stdout, re.MULTILINE)
    assert len(pings) == 1, cp.stdout
    sent, received = map(int, pings[0])
    assert received == sent == 3, f"ping through the tunnel: {received}/{sent}\n{cp.stdout}"
    assert "interface: wg-alpha" in cp.stdout, cp.stdout  # `wgx show wg-alpha`
    assert "latest handshake" in cp.stdout, cp.stdout
    for name in HOSTS:  # what the example wrote is where it says
        assert (tmp_path / "example" / f"wg-{name}.conf").exists()


def _log_setup(level: str, debug: str | None) -> str:
    """stderr of a fresh interpreter that sets up logging as wgx-userspace does and logs
    at every level to a pyroute2, a wgx and a third logger."""
    code = textwrap.dedent("""
        import logging, os
        from wgx.cli import LOG_LEVELS, setup_logging
        setup_logging(LOG_LEVELS[os.environ["LOG_LEVEL"]], os.environ.get("WGX_LOG_DEBUG", ""))
        for name in ("pyroute2.netlink.core", "wgx.device", "other"):
            for lvl in ("debug", "info", "warning", "error"):
                getattr(logging.getLogger(name), lvl)("%s %s", name, lvl)
    """)
    env = {k: v for k, v in os.environ.items() if k != "WGX_LOG_DEBUG"}
    env["LOG_LEVEL"] = level
    if debug is not None:
        env["WGX_LOG_DEBUG"] = debug
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=60, check=True)
    return cp.stderr


def _shown(stderr: str) -> set[str]:
    return {line.split(": ", 1)[1] for line in stderr.splitlines() if ": " in line}


def test_verbose_is_wgx_debug_and_library_warnings() -> None:
    shown = _shown(_log_setup("verbose", None))
    assert shown == {"wgx.device debug", "wgx.device info", "wgx.device warning",
                     "wgx.device error", "pyroute2.netlink.core warning",
                     "pyroute2.netlink.core error", "other warning", "other error"}


def test_wgx_log_debug_names_loggers() -> None:
    shown = _shown(_log_setup("verbose", " pyroute2 ,,"))
    assert {"pyroute2.netlink.core debug", "pyroute2.netlink.core info"} <= shown
    assert "other debug" not in shown and "wgx.device debug" in shown
    shown = _shown(_log_setup("error", "pyroute2,other"))  # asked for, whatever LOG_LEVEL says
    assert shown == {"wgx.device error"} | {f"{n} {lvl}" for n in ("pyroute2.netlink.core",
                     "other") for lvl in ("debug", "info", "warning", "error")}


def test_quieter_levels_stay_quiet() -> None:
    assert _shown(_log_setup("error", None)) == {
        "wgx.device error", "pyroute2.netlink.core error", "other error"}
    assert _log_setup("silent", None) == ""


@pytest.mark.privileged
def test_verbose_daemon_log_has_wgx_lines_not_pyroute2(lab: netlab.Lab,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`wgx up` with LOG_LEVEL=verbose and WGX_LOG_FILE: the daemonized wgx-userspace
    logs its own lines there, and none of pyroute2's netlink messages."""
    h = lab.a
    log = h.dir / "wgx-verbose.log"
    conf = write_conf(lab, h)
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    monkeypatch.setenv("WGX_LOG_FILE", str(log))
    monkeypatch.delenv("WGX_LOG_DEBUG", raising=False)
    try:
        wgx_ok(h, "up", str(conf))
        # Nobody answers on b: the packets start handshake attempts, which wgx logs.
        lab.ping(h, OV4[lab.peer(h).label], count=2, wait=0.5, check=False)
        time.sleep(1)
    finally:
        down = wgx(h, "down", str(conf))
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/wgx/{h.name}")  # only if empty
    assert down.returncode == 0, down.stderr
    text = log.read_text()
    names = LOG_LINE.findall(text)
    assert any(n == "wgx" or n.startswith("wgx.") for n in names), text[-4000:]
    assert "pyroute2" not in text, [line for line in text.splitlines() if "pyroute2" in line][:5]
    assert "wgx.device: interface wgtun0" in text, text[-4000:]
