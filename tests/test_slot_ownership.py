"""Session slot ownership (issue 22): a slot belongs to one keypair until every worker let go.

A keypair's send counter and replay window live in a shared-memory slot
(wgx.dataplane.sessions). Handing a slot that a live keypair (or a worker that
has not yet applied its removal) still uses to a new keypair resets its send
counter: nonce reuse on the wire. Three layers are checked here:

* the allocator alone, as a hypothesis state machine against a model of the
  daemon's keypairs, the pool's sync tokens and 1-3 workers that acknowledge
  removals late, die and are restarted;
* `SharedKeypair.reserve` refusing a counter that went back, and the Engine
  dropping such a keypair without ever sending a (key, counter) pair twice;
* one hub Engine with 3000 peers wired to the real FastPath and WorkerPool (stub
  XDP program, in-process model workers, no namespaces), each peer completing
  several handshakes with it, the slot bookkeeping checked after every step.
"""

from __future__ import annotations

import functools
import multiprocessing
import random
import struct
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_engine import B_ADDR, WALL, Pair, keypair, rng

import wgx.dataplane.pool as pool_mod
from wgx.control.fastpath import FastPath
from wgx.dataplane.pool import WorkerPool
from wgx.dataplane.sessions import (
    KEYPAIRS_PER_PEER,
    SessionSlots,
    SharedKeypair,
    SlotsExhausted,
    slots_for,
)
from wgx.dataplane.worker import WorkerSpec
from wgx.protocol.engine import UNDER_LOAD_HANDSHAKES_PER_SECOND, Engine
from wgx.protocol.messages import MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT
from wgx.protocol.peer import Keypair, Peer
from wgx.protocol.timers import REKEY_TIMEOUT

_TRANSPORT_HDR = struct.Struct("<IIQ")  # type, receiver index, counter


def transport_ids(log: list[tuple[float, Any, Any, bytes]], src: Any) -> list[tuple[int, int]]:
    """(receiver index, counter) of every transport message `src` sent: the receiver
    index names the key, so a repeated pair is a repeated nonce under one key."""
    return [_TRANSPORT_HDR.unpack_from(d)[1:] for _, s, _, d in log
            if s == src and d[0] == MSG_TRANSPORT]


# ------------------------------------------------------------ 1. the allocator alone

SIZES = (4, 8, 16)  # small mappings: exhaustion, and reuse, within a few dozen steps


class SlotAllocator(RuleBasedStateMachine):
    """`SessionSlots` driven the way FastPath drives it, against a model.

    Model: the engine's live keypairs (slot, next send counter, confirmed or not),
    the pool's sync token (one per removal broadcast), and workers, each with the
    greatest token it acknowledged; a worker may die (it holds nothing then) and is
    restarted acknowledged up to the current token (its snapshot holds no removed
    keypair). A slot retired with token t may still be used by every running
    worker that acknowledged less than t. Every allocation writes a new owner tag
    into the slot; a keypair that uses (or removes) a slot with its old tag after
    the slot was handed on is refused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.slots: SessionSlots | None = None

    @initialize(size=st.sampled_from(SIZES), limit=st.integers(1, max(SIZES) + 4),
                workers=st.integers(1, 3))
    def start(self, size: int, limit: int, workers: int) -> None:
        self.slots = SessionSlots(slots=size, limit=limit)
        self.size = size
        self.limit = min(limit, size)  # the constructor clamps to the mapping
        self.live: dict[int, int] = {}  # keypair id -> slot
        self.tags: dict[int, int] = {}  # keypair id -> its slot's owner tag
        self.gone: list[tuple[int, int]] = []  # (slot, tag) of destroyed keypairs
        self.last_tag: dict[int, int] = {}  # slot -> the tag of its latest allocation
        self.sent: dict[int, int] = {}  # keypair id -> its next send counter
        self.unconfirmed: set[int] = set()  # responder keypairs not yet current
        self.retiring: list[tuple[int, int]] = []  # (token, slot), in retirement order
        self.retired_with: dict[int, int] = {}  # slot -> token of its last retirement
        self.token = 0
        self.acked = [0] * workers
        self.running = [True] * workers
        self.refused = 0
        self.next_id = 0

    # -- helpers
    def _s(self) -> SessionSlots:
        assert self.slots is not None
        return self.slots

    def _settled(self) -> int:
        """WorkerPool.settled: the least ack of the running workers."""
        return min((a for a, up in zip(self.acked, self.running, strict=True) if up),
                   default=self.token)

    def _settle(self) -> None:
        t = self._settled()
        due = [r for r in self.retiring if r[0] <= t]
        self.retiring = [r for r in self.retiring if r[0] > t]
        assert self._s().settle(t) == len(due)

    def _pick(self, ids: set[int] | dict[int, int], pick: int) -> int:
        keys = sorted(ids)
        return keys[pick % len(keys)]

    # -- rules
    @rule()
    def create_initiator(self) -> None:
        """A handshake we initiated made a keypair (current at once)."""
        self.create(True)

    @rule()
    def create_responder(self) -> None:
        """A handshake we answered made a keypair: `next` until the initiator confirms it."""
        self.create(False)

    def create(self, initiator: bool) -> None:
        """FastPath._new_keypair allocates the new keypair's slot."""
        slots = self._s()
        full = len(self.live) + len(self.retiring) >= self.limit
        before = slots.refused
        try:
            slot = slots.allocate()
        except SlotsExhausted:
            assert full, (f"refused with {len(self.live)} live + {len(self.retiring)} "
                          f"retiring < limit {self.limit}")
            assert slots.refused == before + 1
            self.refused += 1
            event("allocation refused")
            return
        assert not full, f"allocated past the limit {self.limit}"
        assert slots.refused == before
        # (a) never a slot that a live or retiring keypair holds
        assert slot not in self.live.values(), f"slot {slot} is live"
        assert slot not in {s for _, s in self.retiring}, f"slot {slot} is retiring"
        # (b) never a slot that a running worker may still hold
        token = self.retired_with.get(slot, 0)
        holders = [w for w, (a, up) in enumerate(zip(self.acked, self.running, strict=True))
                   if up and a < token]
        assert not holders, f"slot {slot} (retired with token {token}) reused while " \
                            f"workers {holders} acked only {[self.acked[w] for w in holders]}"
        assert 0 <= slot < self.size
        if slot in self.retired_with:
            event("settled slot reused")
        if self.retiring and any(up and a < self.token
                                 for a, up in zip(self.acked, self.running, strict=True)):
            event("allocated while a worker lags")
        assert slots.send_counter(slot) == 0 and slots.window(slot).greatest == 0
        tag = slots.tag(slot)
        assert tag and tag not in self.tags.values() and tag not in {t for _, t in self.gone}
        kid = self.next_id
        self.next_id += 1
        self.live[kid] = slot
        self.tags[kid] = tag
        self.last_tag[slot] = tag
        self.sent[kid] = 0
        if not initiator:
            self.unconfirmed.add(kid)

    @precondition(lambda self: self.slots is not None and self.live)
    @rule(pick=st.integers(0, 255), n=st.integers(1, 1000))
    def send(self, pick: int, n: int) -> None:
        """A worker or the daemon reserves counters of a live keypair."""
        kid = self._pick(self.live, pick)
        assert self._s().reserve(self.live[kid], n, self.tags[kid]) == self.sent[kid]
        self.sent[kid] += n

    @precondition(lambda self: self.slots is not None and self.unconfirmed)
    @rule(pick=st.integers(0, 255))
    def confirm(self, pick: int) -> None:
        """A responder keypair becomes current (no slot change) and sends its first packet."""
        kid = self._pick(self.unconfirmed, pick)
        self.unconfirmed.discard(kid)
        assert self._s().reserve(self.live[kid], 1, self.tags[kid]) == self.sent[kid]
        self.sent[kid] += 1

    @precondition(lambda self: self.slots is not None and self.live)
    @rule(pick=st.integers(0, 255), announced=st.booleans())
    def destroy(self, pick: int, announced: bool) -> None:
        """The engine dropped a keypair (expired, rotated out, revoked): FastPath._forget
        broadcasts the removal with a fresh token and retires the slot; a keypair the
        workers were never told of (FastPath.sync) retires with the current token."""
        kid = self._pick(self.live, pick)
        slot = self.live.pop(kid)
        tag = self.tags.pop(kid)
        del self.sent[kid]
        self.unconfirmed.discard(kid)
        self.gone.append((slot, tag))
        if announced:
            self.token += 1  # WorkerPool.remove_keypair
        assert self._s().retire(slot, self.token, tag)
        self.retiring.append((self.token, slot))
        self.retired_with[slot] = self.token
        self._settle()

    @precondition(lambda self: self.slots is not None and self.gone)
    @rule(pick=st.integers(0, 255), announced=st.booleans())
    def late_removal(self, pick: int, announced: bool) -> None:
        """A destroyed keypair is removed again (FastPath.sync after lost events): its
        slot, retiring, free or handed on since, is left alone."""
        slot, tag = self.gone[pick % len(self.gone)]
        if announced:
            self.token += 1
        assert not self._s().retire(slot, self.token, tag)
        self._settle()

    @precondition(lambda self: self.slots is not None and self.gone)
    @rule(pick=st.integers(0, 255))
    def stale_use(self, pick: int) -> None:
        """A worker that has not applied a removal yet sends with the keypair: fine while
        its slot is retiring (or free), refused once the slot went to another keypair."""
        slot, tag = self.gone[pick % len(self.gone)]
        first = self._s().reserve(slot, 1, tag)
        if self.last_tag[slot] != tag:
            assert first is None, f"stale tag {tag} used slot {slot}, handed on since"
        else:
            assert first is not None and slot not in self.live.values()

    @rule(w=st.integers(0, 2), pick=st.integers(0, 1 << 16))
    def ack(self, w: int, pick: int) -> None:
        """A running worker applied removals up to some token it was sent (monotonic)."""
        w %= len(self.acked)
        if not self.running[w]:
            return
        lo = self.acked[w]
        self.acked[w] = lo + pick % (self.token - lo + 1)
        self._settle()  # FastPath.on_readable

    @rule(w=st.integers(0, 2))
    def die(self, w: int) -> None:
        """A worker died: it holds nothing any more, and is ignored until restarted."""
        self.running[w % len(self.running)] = False
        self._settle()

    @precondition(lambda self: self.slots is not None and not all(self.running))
    @rule(w=st.integers(0, 2))
    def respawn(self, w: int) -> None:
        dead = [i for i, up in enumerate(self.running) if not up]
        w = dead[w % len(dead)]
        self.running[w] = True
        self.acked[w] = self.token
        self._settle()

    @rule(limit=st.integers(1, max(SIZES) + 4))
    def resize(self, limit: int) -> None:
        """FastPath.sync sets the limit for the peers configured now (it may shrink)."""
        self._s().limit = limit
        self.limit = min(limit, self.size)

    # -- invariants
    @invariant()
    def books_agree(self) -> None:
        if self.slots is None:
            return
        slots = self.slots
        # (c) live and retiring as the model says, in retirement order
        assert slots.live == set(self.live.values())
        assert len(set(self.live.values())) == len(self.live)
        assert list(slots.retiring) == self.retiring
        # (d) every refusal counted, nothing else
        assert slots.refused == self.refused
        # no live keypair's counter was touched by anybody else (an allocation zeroes it)
        for kid, slot in self.live.items():
            assert slots.send_counter(slot) == self.sent[kid], f"counter of slot {slot} reset"
            assert slots.tag(slot) == self.tags[kid], f"slot {slot} has another owner"
        # every slot handed out is exactly one of live, retiring, free: none leaks
        touched = sorted([*slots.live, *(s for _, s in slots.retiring), *slots._free])
        assert touched == list(range(slots._high)), touched
        assert len(slots.live) + len(slots.retiring) <= self.size


SlotAllocator.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                           deadline=None)
TestSlotAllocator = SlotAllocator.TestCase


# ----------------------------------------------- 2. a counter that went back is refused


def shared_keypair(slots: SessionSlots) -> SharedKeypair:
    return SharedKeypair(slots, Peer(bytes(range(32))), 1, 2, True, 0.0, bytes(32), bytes(32))


def test_shared_keypair_refuses_a_counter_that_went_back() -> None:
    slots = SessionSlots(slots=8)
    kp = shared_keypair(slots)
    assert [kp.reserve(3), kp.reserve(1), kp.reserve(2)] == [0, 3, 4]
    slots.set_send_counter(kp.slot, 0)  # the slot was reset under the live keypair
    assert kp.reserve(1) is None
    assert kp.reserve(4) is None  # [1, 5) overlaps [0, 6) handed out before
    assert kp.reserve(1) is None  # 5, still
    assert kp.reserve(1) == 6  # above all it was ever handed out: never a counter twice
    # Its slot handed to another keypair since: refused, even where the new owner's
    # counter lies above everything this one was handed (the owner tag differs).
    assert slots.retire(kp.slot, 1, kp.tag) and slots.settle(1) == 1
    other = shared_keypair(slots)
    assert other.slot == kp.slot and other.tag != kp.tag
    assert other.reserve(100) == 0
    assert kp.reserve(1) is None
    assert not kp.accept(1000)
    assert other.reserve(1) == 100 and other.accept(1000)
    # A plain Keypair has nobody to reset its counter: it never refuses.
    plain = Keypair(Peer(bytes(range(32))), 1, 2, True, 0.0, bytes(32), bytes(32))
    assert [plain.reserve(2), plain.reserve(1)] == [0, 2]


_OPS = st.lists(st.one_of(st.tuples(st.just("reserve"), st.integers(1, 64)),
                          st.tuples(st.just("set"), st.integers(0, 3000))), max_size=40)


@functools.cache
def _one_slots() -> SessionSlots:
    """One SessionSlots for all examples (each holds a file descriptor)."""
    return SessionSlots(slots=8)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_shared_keypair_never_hands_out_a_counter_twice(ops: list[tuple[str, int]]) -> None:
    """Whatever happens to the slot's counter, the counters `reserve` hands one keypair
    never repeat; it refuses (None) exactly when the slot's counter is below them."""
    slots = _one_slots()
    kp = shared_keypair(slots)
    try:
        _reserve_against(slots, kp, ops)
    finally:
        assert slots.retire(kp.slot, 0, kp.tag) and slots.settle(0) == 1


def _reserve_against(slots: SessionSlots, kp: SharedKeypair, ops: list[tuple[str, int]]) -> None:
    handed: set[int] = set()
    top = 0  # everything handed out is below this
    for op, v in ops:
        if op == "set":
            slots.set_send_counter(kp.slot, v)
            continue
        at = slots.send_counter(kp.slot)
        first = kp.reserve(v)
        if at < top:
            assert first is None
            continue
        assert first == at
        got = set(range(first, first + v))
        assert not got & handed
        handed |= got
        top = first + v


def test_engine_drops_a_shared_keypair_whose_counter_went_back() -> None:
    """B's current keypair lives in a slot; the slot's counter is reset under it: B drops
    the keypair (send_counter_reused), rekeys, and never sends a nonce twice."""
    slots = SessionSlots(slots=8)
    p = Pair(seed=5)
    p.B.keypair_factory = functools.partial(SharedKeypair, slots)
    p.establish(0.0)  # A initiates; A's keepalive confirms B's responder keypair
    kp = p.pb.current
    assert isinstance(kp, SharedKeypair)
    for i in range(3):
        p.b_to_a(1.0 + i)
        p.net.pump(1.0 + i)
    assert slots.send_counter(kp.slot) == 3 and len(p.A.tun) == 3
    assert not p.B.drops
    p.B.events.clear()

    slots.set_send_counter(kp.slot, 0)
    now = 1.0 + REKEY_TIMEOUT + 1
    p.b_to_a(now, b"after the reset")
    assert p.B.drops["send_counter_reused"] == 1
    assert kp not in p.pb.keypairs() and p.B.indices.keypair(kp.local_index) is None
    assert ("keypair_gone", kp) in p.B.events
    assert [d[0] for d, _ in p.B.datagrams] == [MSG_INITIATION]  # a rekey, no transport
    p.net.pump(now)  # the packet waited for the handshake and goes out with the new keypair

    new = p.pb.current
    assert isinstance(new, SharedKeypair) and new is not kp and new.initiator
    assert new.slot != kp.slot  # nothing retired the old slot: it stays taken
    sent = transport_ids(p.net.log, B_ADDR)
    assert len(sent) == len(set(sent)) == 4, sent
    assert [c for r, c in sent if r == kp.remote_index] == [0, 1, 2]
    assert p.A.tun[-1].endswith(b"after the reset") and not p.A.drops["replay"]
    assert p.B.drops["send_counter_reused"] == 1


# ------------------------------------------------- 3. 3000 peers against one hub

PEERS = 3000
PER_ROUND = 100  # peers per second of simulated time: hub handshakes stay below 128/s
PASS_GAP = REKEY_TIMEOUT + 1  # seconds between passes: no peer initiates twice within it
LAG_STEPS = 3 * PER_ROUND  # the lagging worker applies its commands this many steps late
HUB_ADDR = ("198.18.0.1", 51820)
assert PER_ROUND < UNDER_LOAD_HANDSHAKES_PER_SECOND


class StubXdp:
    """The XdpProgram methods FastPath calls, doing nothing."""

    attach_mode = "stub"
    under_load = False

    def add_session(self, *args: Any) -> None: ...
    def remove_session(self, *args: Any) -> None: ...
    def set_session_floor(self, *args: Any) -> None: ...
    def set_known_sources(self, *args: Any) -> None: ...
    def set_under_load(self, *args: Any) -> None: ...
    def set_ratelimit(self, *args: Any) -> None: ...
    def set_global_ratelimit(self, *args: Any) -> None: ...
    def set_xsk(self, *args: Any) -> None: ...

    def verdicts(self) -> dict[str, int]:
        return {}


class Inbox:
    """A worker's command pipe as a list: WorkerPool sends, the model worker reads."""

    def __init__(self) -> None:
        self.msgs: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.msgs.append(msg)

    def close(self) -> None: ...


class KeepOpen:
    """The worker's end of the report pipe, which WorkerPool._spawn closes in the
    daemon after the fork: here worker and daemon are one process."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def close(self) -> None: ...


class ModelWorker:
    """Stands in for a worker process: applies the pool's commands as Worker.apply does
    (the keypairs it holds, the greatest sync token applied) and reports its
    acknowledgements like Worker.run, on a real pipe that WorkerPool.read reads."""

    def __init__(self, index: int, inbox: Inbox, report: Any, token: int) -> None:
        self.index = index
        self.inbox = inbox
        self.report = report  # multiprocessing Connection (write end)
        self.ack = self.acked = token  # a fresh worker's snapshot holds no removed keypair
        self.held: dict[int, int] = {}  # local index -> slot
        self.by_slot: dict[int, int] = {}  # slot -> local index
        self.due = 0  # the step at which it next applies its commands
        self.alive = True

    def apply(self) -> bool:
        """Apply everything received; True if an acknowledgement was reported."""
        for msg in self.inbox.msgs:
            if msg[0] == "keypair":
                local, slot = msg[1], msg[2]
                other = self.by_slot.get(slot)
                assert other in (None, local), \
                    f"worker {self.index} told of keypairs {other} and {local} on slot {slot}"
                self.held[local] = slot
                self.by_slot[slot] = local
            elif msg[0] == "keypair_gone":
                slot = self.held.pop(msg[1], None)
                if slot is not None:
                    del self.by_slot[slot]
                self.ack = msg[2]
        self.inbox.msgs.clear()
        if self.ack == self.acked:
            return False
        self.report.send(("ack", self.index, self.ack))
        self.acked = self.ack
        return True

    def die(self) -> None:
        self.alive = False
        self.report.close()


class ModelContext:
    """Replaces the pool's multiprocessing context: `_spawn` "forks" a ModelWorker."""

    def __init__(self) -> None:
        self.pool: WorkerPool | None = None
        self.workers: dict[int, ModelWorker] = {}
        self._pipes = 0

    def Pipe(self, duplex: bool = False) -> tuple[Any, Any]:  # multiprocessing's name
        self._pipes += 1
        if self._pipes % 2:  # WorkerPool._spawn: the command pipe first, then the report pipe
            inbox = Inbox()
            return inbox, inbox
        r, w = multiprocessing.Pipe(duplex=False)
        return r, KeepOpen(w)

    def Process(self, *, target: Any, name: str, daemon: bool,
                args: tuple) -> SimpleNamespace:
        spec, _slots, inbox, report, _set_xsk = args
        assert self.pool is not None
        self.workers[spec.index] = ModelWorker(spec.index, inbox, report.conn,
                                               self.pool.sync_token)
        return SimpleNamespace(start=lambda: None, join=lambda timeout=None: None,
                               is_alive=lambda: False, exitcode=-9, pid=0)

    def running(self) -> list[ModelWorker]:
        return [w for w in self.workers.values() if w.alive]


class WatchedSlots(SessionSlots):
    """SessionSlots that checks every allocation against the model workers: no running
    worker may still hold the slot, nor have acknowledged less than the token of the
    slot's last retirement."""

    def __init__(self, ctx: ModelContext, limit: int) -> None:
        super().__init__(limit=limit)
        self.ctx = ctx
        self.retired_with: dict[int, int] = {}
        self.max_retiring = 0

    def retire(self, slot: int, token: int, tag: int = 0) -> bool:
        retired = super().retire(slot, token, tag)
        if retired:
            self.retired_with[slot] = token
            self.max_retiring = max(self.max_retiring, len(self.retiring))
        return retired

    def allocate(self) -> int:
        slot = super().allocate()
        token = self.retired_with.get(slot, 0)
        for w in self.ctx.running():
            assert w.ack >= token, (f"slot {slot} retired with token {token} handed out "
                                    f"again while worker {w.index} acked {w.ack}")
            assert slot not in w.by_slot, (f"slot {slot} handed out again while worker "
                                           f"{w.index} holds keypair {w.by_slot[slot]} on it")
        return slot


class Hub:
    """The daemon side: one Engine with PEERS peers, FastPath over a stub XDP program, a
    real WorkerPool with `workers` model workers (0: never started), and the peers'
    own Engines; datagrams move in memory and time is simulated."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, workers: int, seed: int) -> None:
        self.rand = random.Random(seed)
        self.ctx = ModelContext()
        monkeypatch.setattr(pool_mod, "_ctx", self.ctx)
        monkeypatch.setattr(pool_mod, "gc", SimpleNamespace(freeze=lambda: None))
        hub_priv, hub_pub = keypair(seed)
        self.engine = Engine(hub_priv, random=rng(seed + 1), wall_offset=WALL)
        self.remotes: list[Engine] = []
        self.hub_peers: list[Peer] = []
        self.remote_peers: list[Peer] = []
        self.addrs: list[tuple[str, int]] = []
        self.index_by_addr: dict[tuple[str, int], int] = {}
        for i in range(PEERS):
            priv, pub = keypair(1_000_000 + seed * PEERS + i)
            remote = Engine(priv, random=rng(2_000_000 + seed * PEERS + i), wall_offset=WALL)
            rp = remote.add_peer(hub_pub)
            rp.endpoint = HUB_ADDR
            addr = (f"100.64.{i >> 8}.{i & 255}", 51820)
            self.remotes.append(remote)
            self.remote_peers.append(rp)
            self.hub_peers.append(self.engine.add_peer(pub))
            self.addrs.append(addr)
            self.index_by_addr[addr] = i
        # FastPath.finish without the XDP program and the fork.
        self.slots = WatchedSlots(self.ctx, slots_for(PEERS))
        prog = StubXdp()
        specs = [WorkerSpec(i, "stub0", i, "stub-tun", 51820, 1420, 180.0, 2**64)
                 for i in range(max(workers, 1))]
        self.pool = WorkerPool(specs, self.slots, prog.set_xsk)
        self.ctx.pool = self.pool
        self.fp = FastPath(self.engine, "stub0", prog, self.pool, self.slots)  # type: ignore[arg-type]
        self.engine.keypair_factory = self.fp._new_keypair
        if workers:
            self.pool.start()
        self.fp.sync()
        self.step_no = 0
        self.owner: dict[int, SharedKeypair] = {}  # slot -> keypair last seen on it
        self.completed: Counter[int] = Counter()  # peer index -> hub handshakes completed
        self.index_of = {id(p): i for i, p in enumerate(self.hub_peers)}

    # -- the daemon's loop, in memory
    def drain(self) -> None:
        """Device._drain_events: mirror the engine's events into the fast path."""
        events = self.engine.events
        assert not events.lost, "engine events overflowed: some were lost"
        while events:
            kind, obj = events.popleft()
            self.fp.on_event(kind, obj)
            if kind == "handshake_complete":
                self.completed[self.index_of[id(obj)]] += 1

    def pump(self, now: float, peers: list[int],
             drop: Callable[[bytes, bool], bool] | None = None) -> None:
        """Move datagrams between the hub and `peers` (and whoever the hub sends to) until
        all are quiet; drop(data, to_hub) True loses a datagram on the way."""
        active = set(peers)
        for _ in range(10):
            moved = False
            for i in sorted(active):
                remote = self.remotes[i]
                out, remote.datagrams[:] = remote.datagrams[:], []
                for data, ep in out:
                    moved = True
                    assert ep == HUB_ADDR
                    if drop is None or not drop(data, True):
                        self.engine.receive_datagram(data, self.addrs[i], now)
                        self.drain()
            out, self.engine.datagrams[:] = self.engine.datagrams[:], []
            for data, ep in out:
                moved = True
                i = self.index_by_addr[ep]
                active.add(i)
                if drop is None or not drop(data, False):
                    self.remotes[i].receive_datagram(data, HUB_ADDR, now)
            if not moved:
                return
        raise AssertionError("datagrams did not settle")

    def workers_run(self, now: float, flush: bool = False) -> None:
        """Worker 0 applies its commands at once, worker 1 some random steps late; their
        acknowledgements go through FastPath.on_readable like Device._from_workers."""
        for w in list(self.ctx.running()):
            if not (flush or w.index == 0 or self.step_no >= w.due):
                continue
            if w.index:
                w.due = self.step_no + self.rand.randint(0, LAG_STEPS)
            if w.apply():
                self.fp.on_readable(self._report_fd(w.index), now)

    def _report_fd(self, index: int) -> int:
        return next(fd for fd, (i, _) in self.pool.reports.items() if i == index)

    def kill(self, index: int, now: float) -> None:
        """A worker dies; the daemon sees its pipe close and restarts it (pool.respawn)."""
        w = self.ctx.workers[index]
        fd = self._report_fd(index)
        w.die()
        self.fp.on_readable(fd, now)
        fresh = self.ctx.workers[index]
        assert fresh is not w and fresh.alive and self.pool.restarts == 1
        assert self.pool.acked[index] == self.pool.sync_token == fresh.ack

    # -- one peer's turn
    def turn(self, i: int, kind: str, now: float) -> None:
        """Peer i and the hub handshake: kind is "peer" or "hub" (who initiates), or
        "peer-drop-response" / "peer-drop-keepalive" (the hub's responder keypair is
        made, but the initiator never confirms it)."""
        hp = self.hub_peers[i]
        done = self.completed[i]
        if kind == "hub":
            self.engine.initiate_handshake(hp, now)
            self.drain()
        else:
            self.remotes[i].initiate_handshake(self.remote_peers[i], now)
        drop: Callable[[bytes, bool], bool] | None = None
        if kind == "peer-drop-response":
            def drop(data: bytes, to_hub: bool) -> bool:
                return not to_hub and data[0] == MSG_RESPONSE
        elif kind == "peer-drop-keepalive":
            def drop(data: bytes, to_hub: bool) -> bool:
                return to_hub and data[0] == MSG_TRANSPORT
        self.pump(now, [i], drop)
        if kind in ("peer", "hub"):
            assert self.completed[i] == done + 1, f"peer {i}: {kind} handshake incomplete"
            assert hp.current is not None and hp.current.initiator == (kind == "hub")
            assert hp.next is None
        else:
            assert self.completed[i] == done and hp.next is not None
        self.step_no += 1
        self.workers_run(now)
        self.check_peer(hp)

    # -- checks
    def check_peer(self, hp: Peer) -> None:
        """After every step, for the peer it touched (the others did not change)."""
        slots = self.slots
        for kp in hp.keypairs():
            assert isinstance(kp, SharedKeypair)
            assert kp.slot in slots.live, f"live keypair on slot {kp.slot}, which is not live"
            assert slots.tag(kp.slot) == kp.tag, f"slot {kp.slot} handed to another keypair"
            prev = self.owner.get(kp.slot)
            if prev is not None and prev is not kp:
                assert not any(prev is k for k in prev.peer.keypairs()), \
                    f"slot {kp.slot} held by two live keypairs"
            self.owner[kp.slot] = kp
            for w in self.ctx.running():
                assert w.by_slot.get(kp.slot, kp.local_index) == kp.local_index, \
                    f"worker {w.index} holds another keypair on slot {kp.slot}"
        assert slots.refused == 0
        assert len(slots.live) + len(slots.retiring) < slots.limit

    def check_all(self) -> None:
        """Everything, from the engine's, the pool's and the slots' own books."""
        slots = self.slots
        live = [kp for p in self.engine.peers.values() for kp in p.keypairs()]
        held = [kp.slot for kp in live if isinstance(kp, SharedKeypair)]
        assert len(held) == len(live) == len(set(held)), "a slot shared by two live keypairs"
        assert set(held) == slots.live
        assert all(slots.tag(kp.slot) == kp.tag for kp in live)  # type: ignore[attr-defined]
        retiring = [s for _, s in slots.retiring]
        tokens = [t for t, _ in slots.retiring]
        assert tokens == sorted(tokens)
        assert sorted([*held, *retiring, *slots._free]) == list(range(slots._high)), \
            "live, retiring and free slots overlap, or one leaked"
        assert len(self.engine.indices) == len(live) + sum(
            p.handshake is not None for p in self.engine.peers.values())
        # The pool mirrors the engine: the keypairs it tells restarted workers of.
        assert {i: (m[2], m[10]) for i, m in self.pool.keypairs.items()} == \
            {kp.local_index: (kp.slot, kp.tag) for kp in live}  # type: ignore[attr-defined]
        retiring_set = set(retiring)
        for w in self.ctx.running():
            for local, slot in w.held.items():
                kp = self.engine.indices.keypair(local)
                assert kp is None or kp.slot == slot  # type: ignore[attr-defined]
                if kp is None:  # the engine dropped it: the worker has not applied that yet
                    assert slot in retiring_set, \
                        f"worker {w.index} holds keypair {local} on slot {slot}, not retiring"
        assert slots.refused == 0

    def close(self) -> None:
        for _, conn in self.pool.reports.values():
            conn.close()
        for w in self.ctx.workers.values():
            if w.alive:
                w.report.close()


# Who initiates in each pass; pass 2 leaves some of the hub's responder keypairs
# unconfirmed (the response or the confirming keepalive is lost), and in pass 3 the
# same peers initiate again before ever confirming them: 4 or 5 completed each.
PASSES = ("peer", "hub", "mixed", "peer", "hub")
UNCONFIRMED = ("peer-drop-response", "peer-drop-keepalive", "peer")


@pytest.mark.parametrize("workers", [0, 2], ids=["workers-not-started", "lagging-worker"])
def test_3000_peers_never_share_a_slot(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    hub = Hub(monkeypatch, workers, seed=22)
    try:
        _run_scale(hub, workers)
    finally:
        hub.close()


def _run_scale(hub: Hub, workers: int) -> None:
    slots = hub.slots
    assert slots.limit == slots_for(PEERS)
    now = 0.0
    live_after: list[int] = []
    high_after: list[int] = []
    for n, kind in enumerate(PASSES):
        order = list(range(PEERS))
        hub.rand.shuffle(order)
        for k, i in enumerate(order):
            if k % PER_ROUND == 0:
                if k:
                    now += 1.0
                    hub.check_all()
                hub.engine.handle_timer(now)  # nothing is due; the daemon would call it
                hub.drain()
                hub.fp.housekeeping(now)
            if workers and n == 2 and k == PEERS // 2:
                hub.kill(1, now)  # the lagging worker, with removals it never applied
            turn = hub.rand.choice(UNCONFIRMED) if kind == "mixed" else kind
            hub.turn(i, turn, now)
        hub.check_all()
        live_after.append(len(slots.live))
        high_after.append(slots._high)
        now += PASS_GAP

    assert min(hub.completed[i] for i in range(PEERS)) >= len(PASSES) - 1
    assert hub.engine.stats["under_load_engaged"] == 0
    assert not hub.engine.drops, hub.engine.drops
    assert slots.refused == 0
    assert live_after[1] == 2 * PEERS  # current and previous of every peer
    # Touched slots: about the keypairs alive at once, not one per handshake. A new slot
    # is touched only when none is free: every touched one is live or retiring then.
    assert slots._high <= KEYPAIRS_PER_PEER * PEERS
    peak_retiring = slots.max_retiring
    assert slots._high <= live_after[1] + 1 + peak_retiring, (high_after, peak_retiring)
    if not workers:
        assert peak_retiring <= 1 and not slots.retiring  # settled at once

    # The hub expires every session (ZERO_KEY_MATERIAL, 3 x REJECT_AFTER_TIME after the
    # last handshake): every slot is retired, and free once the workers caught up.
    for _ in range(PEERS):
        due = hub.engine.get_timer()
        if due is None:
            break
        now = max(now, due)
        hub.engine.handle_timer(now)
        hub.drain()
        hub.pump(now, [])
        hub.step_no += 1
        hub.workers_run(now)
        hub.check_all()
    assert hub.engine.get_timer() is None
    hub.workers_run(now, flush=True)
    hub.check_all()
    assert not slots.live and not slots.retiring
    assert len(slots._free) == slots._high
    assert not hub.pool.keypairs
