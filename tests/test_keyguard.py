"""The keyguard plugin (tests/keyguard.py) can fail: it finds planted keys.

Unit tests use the pure scanner; the end-to-end tests run pytest in a
subprocess with ``-p keyguard`` on small test files that leak a key through
print, a failure message, a log file in tmp_path, and one that does not leak.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keyguard
import pytest

from wgx.protocol import crypto

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_scan_finds_every_form() -> None:
    key = crypto.generate_private_key()
    other = crypto.generate_private_key()
    b64, hx = base64.b64encode(key).decode(), key.hex()
    secrets = {key}
    assert keyguard.scan(f"PrivateKey = {b64}\n", secrets) == ["base64"]
    assert keyguard.scan(f"private_key={hx}", secrets) == ["hex"]
    assert keyguard.scan(hx.upper(), secrets) == ["hex"]
    # inside a longer hex dump, at an odd offset
    assert keyguard.scan("abc" + hx + "0f" * 20, secrets) == ["hex"]
    assert keyguard.scan(f"x{b64}y", secrets) == ["base64"]
    assert keyguard.scan(f"{b64} {hx}", secrets) == ["base64", "hex"]
    # other keys, public keys, truncated forms are not hits
    assert keyguard.scan(base64.b64encode(other).decode() + other.hex(), secrets) == []
    assert keyguard.scan(base64.b64encode(crypto.public_key(key)).decode(), secrets) == []
    assert keyguard.scan(b64[:40] + hx[:62], secrets) == []


def test_register_ignores_degenerate_keys_and_public_files(tmp_path: Path) -> None:
    public = crypto.public_key(crypto.generate_private_key())
    before = set(keyguard.SECRETS)
    keyguard.register(bytes(32))
    keyguard.register(bytes([1]) * 32)
    keyguard.register("not a key")
    pub = tmp_path / "public.key"
    pub.write_text(base64.b64encode(public).decode())
    keyguard.register_file(pub)
    assert before == keyguard.SECRETS


def _run_pytest(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "keyguard", "-p", "no:cacheprovider",
             "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "base"),
             str(tmp_path / "test_sample.py")],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    finally:
        # The planted leaks must not be found again by this session's own keyguard,
        # which scans its tmp_path tree (this directory is inside it) at the end.
        shutil.rmtree(tmp_path / "base", ignore_errors=True)


LEAKY = '''
import base64
from wgx.protocol import crypto
from wgx.control import config

def test_prints_key():
    print(base64.b64encode(crypto.generate_private_key()).decode())

def test_clean():
    k = crypto.generate_private_key()
    print(base64.b64encode(crypto.public_key(k)).decode())

def test_key_in_failure():
    k = crypto.generate_private_key()
    assert k.hex() == "x"

def test_key_in_log(tmp_path):
    conf = config.loads("[Interface]\\nPrivateKey = " + base64.b64encode(
        bytes(range(1, 33))).decode() + "\\n")
    (tmp_path / "daemon.log").write_text("debug: key " + conf.interface.private_key.hex())

def test_key_from_conf_file_on_stderr(tmp_path):
    import sys
    key = base64.b64encode(bytes(range(100, 132))).decode()
    (tmp_path / "wg0.conf").write_text("[Interface]\\nPrivateKey = " + key + "\\n")
    print("oops", key, file=sys.stderr)
'''


@pytest.mark.slow
def test_session_fails_and_names_tests_not_keys(tmp_path: Path) -> None:
    cp = _run_pytest(tmp_path, LEAKY)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert "1 failed, 4 passed" in out, out
    assert "keyguard: FAILED (4 places" in out, out
    for name in ("test_prints_key (Captured stdout call) [base64]",
                 "test_key_in_failure (call failure text) [hex]",
                 "tmp_path (log file test_key_in_log0/daemon.log) [hex]",
                 "test_key_from_conf_file_on_stderr (Captured stderr call) [base64]"):
        prefix = "" if name.startswith("tmp_path") else "test_sample.py::"
        assert f"appears in {prefix}{name}" in out, (name, out)
    assert "test_clean" not in out.split("keyguard:")[0].split("FAILURES")[-1], out
    # the summary never repeats a key
    summary = out[out.index("keyguard: secret keys"):]
    assert keyguard.scan(summary, {bytes(range(1, 33)), bytes(range(100, 132))}) == []
    assert not any(len(w) == 44 and w.endswith("=") for w in summary.split())


@pytest.mark.slow
def test_clean_session_passes(tmp_path: Path) -> None:
    cp = _run_pytest(tmp_path, LEAKY.split("def test_key_in_failure")[0].replace(
        "def test_prints_key", "def _unused"))
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert "keyguard: " in out and "none in the output" in out, out
