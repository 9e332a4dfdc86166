"""Property tests of the UAPI request path: any input gets an errno answer, refusals change nothing.

`UapiTarget` (fuzz/uapi_target.py, shared with the atheris harness) frames the bytes as
`UapiServer` does, answers every request, and raises AssertionError if an answer is not
`key=value` lines plus `errno=N`, or if a refused request or a get changed the device.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

import uapi_target  # noqa: E402
from scenario import static_key  # noqa: E402

from wgx.control import uapi  # noqa: E402

_FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_KEYS = ["private_key", "listen_port", "fwmark", "replace_peers", "public_key", "remove",
         "update_only", "preshared_key", "endpoint", "persistent_keepalive_interval",
         "replace_allowed_ips", "allowed_ip", "protocol_version"]
_P3 = static_key(904)[1]


@pytest.fixture(scope="module")
def target() -> uapi_target.UapiTarget:
    return uapi_target.UapiTarget()


def _values() -> st.SearchStrategy[str]:
    valid = st.sampled_from([
        uapi_target.PEER1.hex(), uapi_target.PEER2.hex(), _P3.hex(), "00" * 32, "true",
        "false", "0", "1", "25", "65535", "65536", "4294967295", "198.18.0.9:51820",
        "[fd00::9]:1", "[fe80::1%eth0]:2", "10.9.0.0/16", "-10.0.0.2/32", "::/0", "",
        str(uapi_target.BUSY_PORT),
    ])
    return st.one_of(valid, st.text(max_size=70),
                     st.text(alphabet="0123456789\u00b2\u0661\uff11", min_size=1, max_size=6),
                     st.text(alphabet="0123456789abcdefABCDEF \t²١", min_size=60, max_size=66))


@st.composite
def set_requests(draw: st.DrawFn) -> str:
    lines = ["set=1"]
    if draw(st.booleans()):
        lines.append(f"public_key={draw(st.sampled_from([uapi_target.PEER1, _P3])).hex()}")
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=12)))
        lines.append(f"{key}={draw(_values())}")
    return re.sub(r"\n+", "\n", "\n".join(lines)).strip("\n")  # no blank line inside


@_FAST
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_get_errno_answers_and_refusals_change_nothing(target, data) -> None:
    target.feed(data)


@_FAST
@given(text=st.text(max_size=300))
def test_arbitrary_text_as_one_request(target, text) -> None:
    request = re.sub(r"\n+", "\n", text).strip("\n")  # one request: no blank line inside
    for prefix in ("", "set=1\n", "get=1\n"):
        codes = target.feed((prefix + request).encode() + b"\n\n")
        assert len(codes) == 1


@_FAST
@given(req=set_requests())
def test_structured_set_requests(target, req) -> None:
    codes = target.feed(req.encode() + b"\n\n")
    assert len(codes) == 1 and codes[0] in (0, -22, -98)  # EADDRINUSE only for BUSY_PORT


@_FAST
@given(req=set_requests(), bad=st.sampled_from(["listen_port=x", "bogus=1", "no equals sign",
                                                "endpoint=1.2.3.4", "allowed_ip=10.0.0.0/33",
                                                f"public_key={'00' * 32}"]),
       where=st.integers(0, 20))
def test_one_bad_line_anywhere_refuses_the_whole_set(target, req, bad, where) -> None:
    lines = req.split("\n")
    if bad.startswith("public_key"):
        lines.append(bad)  # last, so that no later remove=true line applies to it
    else:
        lines.insert(1 + where % len(lines), bad)
    assert target.feed("\n".join(lines).encode() + b"\n\n") == [-22]  # and nothing changed


@_FAST
@given(requests=st.lists(st.text(max_size=40).map(lambda s: s.replace("\n\n", "\n")),
                         max_size=5), tail=st.binary(max_size=20))
def test_framing_splits_at_blank_lines_and_keeps_the_tail(requests, tail) -> None:
    # A request never ends in "\n" here: "x\n" + "\n\n" would end the request one byte early.
    requests = [r.rstrip("\n") for r in requests]
    tail = tail.replace(b"\n\n", b"\n").rstrip(b"\n")
    buf = bytearray(b"".join(r.encode() + b"\n\n" for r in requests) + tail)
    assert uapi.take_requests(buf) == requests
    assert bytes(buf) == tail


# Inputs that made handle_request raise ValueError (which would stop the daemon's event
# loop) or that were accepted although wireguard-go refuses them. Each is also a file in
# fuzz/corpus/uapi/.
@pytest.mark.parametrize("line", [
    "listen_port=\u00b2",  # str.isdigit() is true, int() raises
    "fwmark=\u00b9\u00b2",
    "listen_port=" + "1" * 5000,  # beyond int()'s 4300-digit limit
    "listen_port=\u0661\u0662",  # Arabic-Indic digits: int() gave 12
    f"public_key={_P3.hex()}\npersistent_keepalive_interval=\u00b3",
    f"public_key={_P3.hex()}\nendpoint=1.2.3.4:\u0661",
    "private_key=" + "00" * 16 + " " + "00" * 15 + "01",  # fromhex() skipped the space
    "private_key=" + "00" * 31 + "01\t",
])
def test_non_ascii_digits_and_spaced_hex_are_refused(target, line: str) -> None:
    assert target.feed(f"set=1\n{line}\n\n".encode()) == [-22]


def test_regression_corpus_files_exist() -> None:
    corpus = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "uapi"
    assert (corpus / "regression-listen-port-superscript-digit").read_bytes() == (
        "set=1\nlisten_port=\u00b2\n\n".encode())
