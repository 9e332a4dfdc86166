"""Property tests of the four message parsers and of the Engine's receive path.

Struct layer (wgx/protocol/messages.py): valid messages round-trip; any bytes give either a
message or `MessageError` (the documented error type, a ValueError) and nothing else;
truncated, extended and re-typed messages are refused.

Engine (wgx/protocol/engine.py): datagrams captured from real handshakes between Engines
(fuzz/scenario.py), mutated, optionally with mac1/mac2 recomputed as an attacker who knows
the public key (and holds a cookie) can, never raise and change nothing but `drops` counters,
the anti-DoS load accounting and cookie replies (`scenario.Target.feed` checks a full
snapshot: keys, peers, endpoints, sessions, replay windows, handshake state, timers, cookies,
indices, events, TUN output).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

import scenario  # noqa: E402

from wgx.protocol.messages import (  # noqa: E402
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_LEN,
    TRANSPORT_MIN_LEN,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    message_type,
    pack_transport_header,
    unpack_transport_header,
)

_FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u32 = st.integers(0, 2**32 - 1)


def _b(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


initiations = st.builds(Initiation, u32, _b(32), _b(48), _b(28), _b(16), _b(16))
responses = st.builds(Response, u32, u32, _b(32), _b(16), _b(16), _b(16))
cookie_replies = st.builds(CookieReply, u32, _b(24), _b(32))
structs = st.one_of(initiations, responses, cookie_replies)
_LEN = {Initiation: INITIATION_LEN, Response: RESPONSE_LEN, CookieReply: COOKIE_REPLY_LEN}
_TYPE = {Initiation: MSG_INITIATION, Response: MSG_RESPONSE, CookieReply: MSG_COOKIE_REPLY}


# ------------------------------------------------------------------ struct layer


def test_message_error_is_the_documented_value_error() -> None:
    assert issubclass(MessageError, ValueError)


@_FAST
@given(msg=structs)
def test_valid_messages_round_trip(msg) -> None:
    cls = type(msg)
    data = msg.pack()
    assert len(data) == _LEN[cls] and message_type(data) == _TYPE[cls]
    assert cls.unpack(data) == msg
    scenario.check_struct_parsers(data)


@_FAST
@given(receiver=u32, counter=st.integers(0, 2**64 - 1), body=st.binary(min_size=16,
                                                                       max_size=200))
def test_transport_header_round_trips(receiver, counter, body) -> None:
    data = pack_transport_header(receiver, counter) + body
    assert message_type(data) == MSG_TRANSPORT
    assert unpack_transport_header(data) == (receiver, counter)
    assert unpack_transport_header(memoryview(data)) == (receiver, counter)


@settings(max_examples=500, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=300),
    # Right sizes with a plausible header, so the length checks are not the only gate.
    st.sampled_from([148, 92, 64, 32, 33, 200]).flatmap(
        lambda n: st.tuples(st.integers(0, 6), st.binary(min_size=n - 1, max_size=n - 1))
        .map(lambda t: bytes([t[0]]) + t[1])),
))
def test_any_bytes_parse_or_raise_message_error_only(data) -> None:
    scenario.check_struct_parsers(data)  # any other exception fails the test


@_FAST
@given(msg=structs, cut=st.integers(1, 148), extra=st.binary(min_size=1, max_size=64),
       new_type=st.integers(0, 255), reserved=st.tuples(st.integers(1, 3), st.integers(1, 255)))
def test_truncated_extended_retyped_messages_are_refused(msg, cut, extra, new_type,
                                                         reserved) -> None:
    cls = type(msg)
    data = msg.pack()
    bad = [data[: max(0, len(data) - cut)], data + extra]
    if new_type != data[0]:
        bad.append(bytes([new_type]) + data[1:])
    pos, value = reserved
    bad.append(data[:pos] + bytes([value]) + data[pos + 1:])
    for b in bad:
        with pytest.raises(MessageError):
            cls.unpack(b)
        assert message_type(b) != _TYPE[cls]
        scenario.check_struct_parsers(b)


@_FAST
@given(receiver=u32, counter=st.integers(0, 2**64 - 1), cut=st.integers(1, 32),
       new_type=st.integers(0, 255), reserved=st.tuples(st.integers(1, 3), st.integers(1, 255)))
def test_short_or_retyped_transport_is_refused(receiver, counter, cut, new_type,
                                               reserved) -> None:
    data = pack_transport_header(receiver, counter) + bytes(16)
    bad = [data[: TRANSPORT_MIN_LEN - cut]]
    if new_type != MSG_TRANSPORT:
        bad.append(bytes([new_type]) + data[1:])
    pos, value = reserved
    bad.append(data[:pos] + bytes([value]) + data[pos + 1:])
    for b in bad:
        with pytest.raises(MessageError):
            unpack_transport_header(b)
        assert message_type(b) != MSG_TRANSPORT


# ------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def targets() -> list[scenario.Target]:
    """A, B, A under load, B under load, each in the state the scenario left it in."""
    return [scenario.Target(scenario.build(), name, under_load=load)
            for load in (False, True) for name in ("A", "B")]


@st.composite
def mutated(draw: st.DrawFn, seen: list[bytes], engine) -> bytes:
    """A captured datagram under a few byte-level mutations (or, sometimes, pure junk)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(seen)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "set", "cut", "extend", "type", "index", "splice",
                                   "aim", "aim"]))
        if op in ("flip", "set") and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = data[i] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(
                st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=32))
        elif op == "type" and data:
            data[0] = draw(st.integers(0, 5))
        elif op == "index" and len(data) >= 12:
            # Point the message at another index: sender/receiver fields start at 4 (and 8).
            at = draw(st.sampled_from([4, 8]))
            data[at:at + 4] = struct.pack("<I", draw(u32))
        elif op == "aim":
            data = bytearray(scenario.aim(bytes(data), engine))
        elif op == "splice":
            other = draw(st.sampled_from(seen))
            cut = draw(st.integers(0, min(len(data), len(other))))
            data = data[:cut] + bytearray(other[cut:])
    return bytes(data)


# (target, fix mac1?, fix mac2?, source, clock)
hostile = st.tuples(st.integers(0, 3), st.booleans(), st.booleans(),
                    st.sampled_from(scenario.SOURCES),
                    st.sampled_from([scenario.T_FUZZ, scenario.T_FUZZ + 0.5, scenario.T_LATE]))


@_FAST
@given(data=st.data(), picks=st.lists(hostile, min_size=1, max_size=6))
def test_mutated_captured_datagrams_never_raise_or_change_state(targets, data, picks) -> None:
    for which, mac1, mac2, src, now in picks:
        t = targets[which]
        msg = data.draw(mutated(t.sc.seen[t.name], t.engine))
        if mac1:
            msg = scenario.fix_mac1(msg, t.engine.public_key)
        if mac2:
            msg = scenario.fix_mac2(t.engine, msg, src)
        t.feed(msg, src, now)  # raises on any exception or state change


@_FAST
@given(which=st.integers(0, 3), raw=st.binary(max_size=300), mac1=st.booleans(),
       src=st.sampled_from(scenario.SOURCES))
def test_arbitrary_bytes_never_raise_or_change_state(targets, which, raw, mac1, src) -> None:
    t = targets[which]
    if mac1:
        raw = scenario.fix_mac1(raw, t.engine.public_key)
    t.feed(raw, src, scenario.T_FUZZ)


def test_replayed_captured_datagrams_reach_the_handshake_code(targets) -> None:
    """The captured set is not trivially dropped: replays reach noise and the cookie path."""
    for t in targets:
        before = dict(t.engine.drops)
        for msg in t.sc.seen[t.name]:
            fixed = scenario.fix_mac1(msg, t.engine.public_key)
            for m in (msg, fixed, scenario.fix_mac2(t.engine, fixed, scenario.A_ADDR)):
                t.feed(m, scenario.A_ADDR, scenario.T_FUZZ)
        grew = {k for k, v in t.engine.drops.items() if v > before.get(k, 0)}
        assert {"replay", "unknown_index", "bad_mac1"} <= grew, (t.name, grew)
        if t.name == "B":
            assert "stale_timestamp" in grew
        else:
            assert "handshake_auth" in grew  # a response for A's pending handshake, mac1 fixed


def test_the_state_check_can_fail() -> None:
    """Positive control: the held-back (authentic, unseen) initiation does change B."""
    sc = scenario.build()
    t = scenario.Target(sc, "B", under_load=False)
    (src, _dst, held), = sc.held
    with pytest.raises(AssertionError, match="state of B changed"):
        t.feed(held, src, scenario.T_FUZZ)
