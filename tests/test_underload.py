"""The daemon mirrors the engine's under-load state into the XDP program.

Without it the XDP per-source initiation rate limit (bpf/wgx_xdp.c) never
engages: the flag lives in the program's config map and only the daemon knows
when the engine is under load.  A fake program stands in for XdpProgram.
"""

from __future__ import annotations

from wgx.control.fastpath import FastPath
from wgx.dataplane.xdp import XdpError
from wgx.protocol import crypto
from wgx.protocol.cookie import CookieGenerator
from wgx.protocol.engine import UNDER_LOAD_HANDSHAKES_PER_SECOND, Engine
from wgx.protocol.messages import Initiation


class FakeProg:
    def __init__(self) -> None:
        self.under_load = False
        self.writes: list[bool] = []
        self.fail = False
        self.known: list[str] = []
        self.shed = 0

    def verdicts(self) -> dict[str, int]:
        return {"drop_ratelimit": self.shed, "drop_ratelimit_global": 0}

    def set_known_sources(self, addrs: list[str]) -> None:
        self.known = list(addrs)

    def set_under_load(self, flag: bool) -> None:
        if self.fail:
            raise XdpError("closed", "gone")
        self.under_load = flag
        self.writes.append(flag)


def _flood(engine: Engine, now: float, n: int) -> None:
    assert engine.public_key is not None
    gen = CookieGenerator(engine.public_key)
    for i in range(n):
        msg = Initiation(i, bytes(32), bytes(48), bytes(28), bytes(16), bytes(16)).pack()
        engine.receive_datagram(gen.add_macs(msg, now), ("198.19.0.1", 1000 + i), now)
    engine.datagrams.clear()


def test_fastpath_mirrors_under_load_into_xdp_only_on_change() -> None:
    engine = Engine(crypto.generate_private_key())
    prog = FakeProg()
    fp = FastPath(engine, "ul0", prog, None, None)  # type: ignore[arg-type]
    fp.set_under_load(engine.under_load(0.0), 0.0)
    assert prog.writes == [False]
    fp.housekeeping(0.5)
    assert prog.writes == [False]  # unchanged: no map write
    _flood(engine, 1.0, UNDER_LOAD_HANDSHAKES_PER_SECOND)
    fp.set_under_load(engine.under_load(1.0), 1.0)
    fp.set_under_load(engine.under_load(1.1), 1.1)
    assert prog.under_load and prog.writes == [False, True]
    fp.housekeeping(1.5)  # hold not over yet
    assert prog.under_load
    fp.housekeeping(2.1)  # engine no longer under load: XDP lets initiations through
    assert not prog.under_load and prog.writes == [False, True, False]
    assert engine.stats["under_load_engaged"] == 1


def test_fastpath_under_load_map_error_is_retried() -> None:
    engine = Engine(crypto.generate_private_key())
    prog = FakeProg()
    fp = FastPath(engine, "ul0", prog, None, None)  # type: ignore[arg-type]
    prog.fail = True
    fp.set_under_load(True, 0.0)
    assert prog.writes == []
    prog.fail = False
    fp.set_under_load(True, 0.1)
    assert prog.writes == [True]


def test_fastpath_known_sources_follow_peer_endpoints() -> None:
    engine = Engine(crypto.generate_private_key())
    prog = FakeProg()
    fp = FastPath(engine, "ul0", prog, None, None)  # type: ignore[arg-type]
    p1 = engine.add_peer(crypto.public_key(crypto.generate_private_key()))
    p2 = engine.add_peer(crypto.public_key(crypto.generate_private_key()))
    p1.endpoint = ("198.18.0.2", 51821)
    fp._sync_known()
    assert prog.known == ["198.18.0.2"]
    p2.endpoint = ("fd18::9", 1)
    p1.endpoint = ("198.18.0.7", 51821)  # roamed
    fp._sync_known()
    assert prog.known == ["198.18.0.7", "fd18::9"]
    prog.known = ["sentinel"]
    fp._sync_known()  # unchanged set: no map write
    assert prog.known == ["sentinel"]


def test_fastpath_stays_under_load_while_xdp_still_sheds() -> None:
    """The engine only sees what XDP lets through; XDP's own drops keep it engaged."""
    engine = Engine(crypto.generate_private_key())
    prog = FakeProg()
    fp = FastPath(engine, "ul0", prog, None, None)  # type: ignore[arg-type]
    _flood(engine, 1.0, UNDER_LOAD_HANDSHAKES_PER_SECOND)
    fp.set_under_load(engine.under_load(1.0), 1.0)
    assert prog.under_load
    prog.shed = 5000  # XDP keeps dropping the flood...
    fp.housekeeping(1.5)
    prog.shed = 9000
    fp.housekeeping(2.0)
    # ...so although the engine (which saw nothing since t=1) is no longer under load,
    # XDP is not released, not even by a batch handled in between.
    assert not engine.under_load(2.4)
    fp.set_under_load(engine.under_load(2.4), 2.4)
    fp.housekeeping(2.5)  # no new drops at 2.5, but the ones seen at 2.0 hold until 3.0
    assert prog.under_load
    fp.housekeeping(3.0)
    assert not prog.under_load  # the flood is over: released
