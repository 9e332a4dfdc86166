"""Shared pytest policy and fixtures.

`privileged` marker policy: a test marked ``@pytest.mark.privileged`` needs root,
``ip netns`` and /dev/net/tun.  Without them it is skipped -- except when the
environment variable CI=true: then it FAILS with the reason, because a skipped
privileged test in CI would hide that the interop suite never ran.  The same
holds for any skip raised later inside such a test (e.g. a missing
implementation binary): under CI=true it is reported as a failure.

The keyguard plugin (tests/keyguard.py) is registered here: it collects every
secret key the suite uses and fails the session if one appears in any test's
captured output or in a daemon log netlab wrote.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import keyguard
import netlab
import pytest

# The console scripts (wgx, wgx-userspace) live beside the interpreter running the
# tests, e.g. .venv/bin; tests and the daemons they start find them through PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@functools.cache
def _privileged_problems() -> tuple[str, ...]:
    return tuple(netlab.environment_problems())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "privileged: needs root, network namespaces and TUN (never skipped under CI=true)",
    )
    # Fails the session if a secret key the suite used appears in its output (issue 6).
    if not config.pluginmanager.has_plugin("keyguard"):
        config.pluginmanager.register(keyguard, "keyguard")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Namespaces left behind by earlier runs that were killed hard (SIGKILL):
    # only ones recorded by netlab whose owning process is gone.
    if os.geteuid() == 0:
        with contextlib.suppress(Exception):  # housekeeping never breaks the session
            netlab.sweep_stale()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    problems = _privileged_problems()
    if problems:
        reason = "privileged test cannot run: " + "; ".join(problems)
        if in_ci():
            pytest.fail(
                reason + " (CI=true: skipping privileged tests is not allowed)", pytrace=False
            )
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and in_ci()
        and item.get_closest_marker("privileged") is not None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped under CI=true, counted as failure: {reason}"


@pytest.fixture
def lab():
    """A fresh two-host netlab.Lab, torn down after the test."""
    with netlab.Lab() as the_lab:
        yield the_lab


@pytest.fixture
def lab_name():
    """A fresh `wgx lab` name; the lab is taken down afterwards if the test left it up."""
    import secrets
    import subprocess

    name = f"wgxt{secrets.token_hex(3)}"
    yield name
    if (Path("/run/wgx-lab") / name / "state.json").exists():
        subprocess.run(["wgx", "lab", "down", "--name", name], capture_output=True, timeout=120)
