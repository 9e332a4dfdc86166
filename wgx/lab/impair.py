"""A lossy, reordering, duplicating, delaying underlay for the netns lab.

    spec = parse("loss=5%,reorder=25%,dup=2%,delay=10ms")   # ImpairError names a bad field
    Switch(["p-alpha", "p-beta"], spec.with_seed(), stats="impair.json").run()

Why a userspace stage (and not netem, tc-BPF or nftables)
---------------------------------------------------------
What this kernel (6.18, no modules) has was checked with `tc qdisc add` and
/proc/config.gz: no netem, no fq, no etf, no fq_codel/sfq/prio/plug; only
htb, tbf, pfifo and clsact/ingress, with cls_bpf and act_mirred. Loss and
duplication could be done in the kernel (a clsact program returning
TC_ACT_SHOT, `bpf_clone_redirect`), but nothing here can *hold* a packet for a
while: an EDT time stamp (`bpf_skb_set_tstamp`) is only honoured by fq, etf and
netem, which are all missing, and tbf/htb only delay what exceeds a rate, so a
fixed one-way delay, jitter and "this packet arrives after later ones" are
impossible in the kernel. NFQUEUE could hand packets to userspace, but cannot
duplicate them and costs the same netlink round trip per packet as a socket.
Once every packet has to visit userspace for the delay anyway, doing loss, dup
and reorder in the same place costs nothing more and buys one more thing that
a BPF program cannot give: a seedable random stream, so the n-th packet that
enters a port meets the same fate in every run with the same seed (bpf's
prandom cannot be seeded).

So an impaired lab puts a middle namespace (NAME-sw) between the hosts. Each
host's `ul0` is a veth whose other end (`p-HOST`) lives there, and one process
in that namespace (this module's `Switch`) reads every frame from each port
with an AF_PACKET socket and writes it to the port of the destination MAC
(learned from source MACs; broadcast and unknown destinations are flooded),
after the impairment of the port it came in on. The stage is a plain L2 wire
for the hosts: ARP/ND, IPv4 and IPv6 pass, and nothing changes outside the lab
namespaces. Both dataplanes see it the same way: in XDP mode the receiving
host's `ul0` still gets every frame from its veth peer, so its XDP program
runs on everything that survives the stage.

Each frame is impaired once, on the port where it enters the stage, so every
direction between two hosts is impaired once with the same settings (with
two hosts that is exactly "both directions").

Semantics (per packet entering a port, in this order)
-----------------------------------------------------
* loss=P%    dropped with probability P.
* dup=P%     with probability P a second copy is sent too (each copy gets its
             own jitter and reorder decision, like netem's duplicates).
* delay=T    every copy leaves T after it arrived ...
* jitter=T   ... plus a uniform random offset in [-T, +T] (T <= delay).
             Jitter reorders packets by itself, as netem's does.
* reorder=P% with probability P a copy is held back `hold` longer than the
             others, so packets that arrived after it overtake it.
* hold=T     extra delay of held-back packets (default: delay, at least 1 ms).
* seed=N     the random stream (one per port, from N and the port name); the
             default is a random seed, recorded so a run can be repeated.
* limit=N    at most N packets waiting in the stage; more are dropped and
             counted as `overflow` (default 10000).

Counters (per port = per sending host; JSON in LAB_DIR/impair.json, refreshed
every 0.5 s and shown by `wgx lab status`): `rx` frames in, `dropped` by loss,
`overflow`, `duplicated` (extra copies made), `held` (copies held back),
`delayed` (copies that waited at all), `tx` copies sent, `reordered` (packets
whose first copy left after a packet that entered later: the reordering that
really happened, from held-back copies and jitter alike; a held copy with no
later packet in the meantime is not counted), `gso` (GSO super-frames, see
below), `send_errors`, `flooded` (sent to every other port), `socket_drops`
(frames the kernel dropped because the stage did not read them in time: lost
like `dropped`, but not asked for).

Limits, by design
-----------------
* Timing: epoll wakes with 1 ms resolution, so a packet leaves up to ~1 ms
  after its due time; delays are "T, +0..1 ms".
* Throughput: one Python process on one core, measured 8-14 us of CPU per
  frame on a busy 2-vCPU VM: TCP on the bare underlay drops from 4.7 Gbit/s to
  ~360 Mbit/s through the stage, the tunnel (~200 Mbit/s there) does not slow
  down. `--impair none` still goes through it (docs/reliability.md).
* Segmentation: a GSO super-frame would be impaired as one unit, so the lab
  turns off TSO/GSO/USO on the hosts' `ul0` (the stack then segments before
  the wire). Checksum offload stays on: frames are read and written with a
  virtio-net header (PACKET_VNET_HDR), so a partial checksum is handed on as
  one, never corrupted. `gso` counts super-frames that still arrived (passed
  whole); it should stay 0.
* Queues: all frames of a UDP flow leave a port on one TX queue (the kernel's
  flow hash), so with XDP the receiving host handles one tunnel on one queue.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("wgx.impair")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6  # struct tpacket_stats {tp_packets, tp_drops}; reading resets it
VNET_HDR_LEN = 10  # struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_*
MAX_FRAME = 65536 + VNET_HDR_LEN
MAX_DELAY = 10.0  # seconds; anything longer is surely a typo
MIN_HOLD = 1e-3
DEFAULT_LIMIT = 10000
STATS_INTERVAL = 0.5
RX_BUDGET = 256  # frames per port per wake-up, so one busy port cannot starve the other

FIELDS: dict[str, str] = {
    "loss": "P%: drop a packet with probability P",
    "reorder": "P%: hold a packet back (see hold) so that later ones overtake it",
    "dup": "P%: send a second copy of a packet",
    "delay": "T: fixed one-way delay (units s, ms, us), e.g. 10ms",
    "jitter": "T: add a uniform random -T..+T to the delay (T <= delay; reorders too)",
    "hold": "T: extra delay of reordered packets (default: delay, at least 1ms)",
    "seed": "N: seed of the random decisions (default: random, shown by status)",
    "limit": f"N: packets the stage may hold at once; beyond, drop (default {DEFAULT_LIMIT})",
}
COUNTERS = ("rx", "rx_bytes", "dropped", "overflow", "duplicated", "held", "delayed", "tx",
            "tx_bytes", "reordered", "gso", "send_errors", "flooded", "socket_drops")


class ImpairError(ValueError):
    """A bad --impair specification; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


# ------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class ImpairSpec:
    """Impairment settings: probabilities as fractions, times in seconds."""

    loss: float = 0.0
    reorder: float = 0.0
    dup: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    hold: float | None = None
    seed: int | None = None
    limit: int = DEFAULT_LIMIT

    @property
    def reorder_hold(self) -> float:
        """Extra delay of held-back packets."""
        return self.hold if self.hold is not None else max(self.delay, MIN_HOLD)

    def with_seed(self) -> ImpairSpec:
        """This spec, with a random seed if it had none (so the run can be repeated)."""
        if self.seed is not None:
            return self
        return replace(self, seed=random.SystemRandom().randrange(2**32))

    def canonical(self) -> str:
        """The spec as `parse` reads it back, fields that are not default only."""
        out = [f"{k}={_fmt_percent(getattr(self, k))}" for k in ("loss", "reorder", "dup")
               if getattr(self, k)]
        out += [f"{k}={_fmt_time(getattr(self, k))}" for k in ("delay", "jitter")
                if getattr(self, k)]
        if self.hold is not None:
            out.append(f"hold={_fmt_time(self.hold)}")
        if self.seed is not None:
            out.append(f"seed={self.seed}")
        if self.limit != DEFAULT_LIMIT:
            out.append(f"limit={self.limit}")
        return ",".join(out) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImpairSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _fmt_percent(p: float) -> str:
    return f"{round(p * 100, 6):g}%"


def _fmt_time(t: float) -> str:
    if t == 0:
        return "0"
    if t >= 1:
        return f"{round(t, 9):g}s"
    if t >= 1e-3:
        return f"{round(t * 1e3, 6):g}ms"
    return f"{round(t * 1e6, 3):g}us"


def _percent(name: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"%?", value)
    if not m:
        raise ImpairError(name, f"{value!r} is not a percentage (write e.g. {name}=5%)")
    p = float(m[1])
    if p > 100:
        raise ImpairError(name, f"{value} is more than 100%")
    return p / 100


def _duration(name: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"(s|ms|us)?", value)
    if not m or (m[2] is None and float(m[1]) != 0):
        raise ImpairError(name, f"{value!r} is not a duration (write e.g. {name}=10ms; "
                                f"units s, ms, us)")
    t = float(m[1]) * _TIME_UNITS[m[2] or "s"]
    if t > MAX_DELAY:
        raise ImpairError(name, f"{value} is longer than the {MAX_DELAY:g}s the lab allows")
    return t


def _integer(name: str, value: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"\d+", value) or not lo <= int(value) <= hi:
        raise ImpairError(name, f"{value!r} is not a whole number from {lo} to {hi}")
    return int(value)


def parse(text: str) -> ImpairSpec:
    """Read `loss=5%,reorder=25%,dup=2%,delay=10ms[,jitter=..,hold=..,seed=..,limit=..]`.

    Fields may come in any order, each at most once; `none` (or an empty
    string) means no impairment but still the stage. ImpairError names the
    first bad field.
    """
    text = text.strip()
    if text in ("", "none"):
        return ImpairSpec()
    values: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            raise ImpairError(key or item, f"{item!r} is not FIELD=VALUE "
                                           f"(fields: {', '.join(FIELDS)})")
        if key not in FIELDS:
            raise ImpairError(key, f"unknown field (fields: {', '.join(FIELDS)})")
        if key in values:
            raise ImpairError(key, "given twice")
        if key in ("loss", "reorder", "dup"):
            values[key] = _percent(key, value)
        elif key in ("delay", "jitter", "hold"):
            values[key] = _duration(key, value)
        elif key == "seed":
            values[key] = _integer(key, value, 0, 2**64 - 1)
        else:
            values[key] = _integer(key, value, 1, 1_000_000)
    spec = ImpairSpec(**values)
    if spec.jitter > spec.delay:
        raise ImpairError("jitter", f"{_fmt_time(spec.jitter)} is more than the delay "
                                    f"({_fmt_time(spec.delay)}): a packet cannot leave "
                                    f"before it arrived")
    if spec.hold is not None and spec.hold <= 0:
        raise ImpairError("hold", "must be more than 0")
    return spec


# ------------------------------------------------------------------- sans-I/O core


class Impairment:
    """The fate of every packet entering one port; no I/O, the clock is passed in.

    `admit(now, backlog)` numbers the packet and returns the times at which its
    copies leave (none: dropped). `sent(seq, first)` is called when a copy
    actually leaves and counts real reordering. Every packet consumes the same
    six random numbers whatever happens to it, so the n-th packet's fate
    depends only on the seed and n.
    """

    __slots__ = ("spec", "_rand", "_seq", "_max_sent", "counters")

    def __init__(self, spec: ImpairSpec, stream: str) -> None:
        self.spec = spec
        self._rand = random.Random(f"{spec.seed}/{stream}").random
        self._seq = 0
        self._max_sent = -1
        self.counters = dict.fromkeys(COUNTERS, 0)

    def admit(self, now: float, backlog: int = 0) -> tuple[int, tuple[float, ...]]:
        spec, rand, c = self.spec, self._rand, self.counters
        seq = self._seq
        self._seq = seq + 1
        c["rx"] += 1
        u_loss, u_dup, u_j0, u_r0, u_j1, u_r1 = (rand(), rand(), rand(), rand(), rand(),
                                                 rand())
        if u_loss < spec.loss:
            c["dropped"] += 1
            return seq, ()
        copies = 2 if u_dup < spec.dup else 1
        if backlog + copies > spec.limit:
            c["overflow"] += 1
            return seq, ()
        times = []
        for u_j, u_r in ((u_j0, u_r0), (u_j1, u_r1))[:copies]:
            t = now + spec.delay
            if spec.jitter:
                t += (2 * u_j - 1) * spec.jitter
            if u_r < spec.reorder:
                t += spec.reorder_hold
                c["held"] += 1
            if t > now:
                c["delayed"] += 1
            times.append(t)
        if copies == 2:
            c["duplicated"] += 1
        return seq, tuple(times)

    def sent(self, seq: int, first: bool) -> None:
        """A copy of packet `seq` left; `first`: no copy of it left before."""
        self.counters["tx"] += 1
        if not first:
            return
        if seq < self._max_sent:
            self.counters["reordered"] += 1
        else:
            self._max_sent = seq


# ------------------------------------------------------------------------ the wire


def open_port(ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` that sees frames arriving there (not our own)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        s.bind((ifname, ETH_P_ALL))
    except OSError:
        s.close()
        raise
    return s


class Switch:
    """The impairing L2 switch: one AF_PACKET socket per port, one thread.

    Frames entering port i are impaired by port i's `Impairment` and leave
    through the port of their destination MAC (two ports: always the other).
    """

    def __init__(self, ports: Sequence[str], spec: ImpairSpec,
                 stats: str | os.PathLike[str] | None = None) -> None:
        if len(ports) < 2 or len(set(ports)) != len(ports):
            raise ValueError(f"a switch needs two or more distinct ports, not {ports}")
        self.names = list(ports)
        self.spec = spec
        self.stats_path = Path(stats) if stats is not None else None
        self.imps = [Impairment(spec, name) for name in self.names]
        self.socks: list[socket.socket] = []
        self.macs: dict[bytes, int] = {}
        self.heap: list[tuple[float, int, int, int, tuple[int, ...], bytes]] = []
        self._order = 0
        self._dups: dict[tuple[int, int], int] = {}
        self.started = time.time()
        self.stopping = False

    def open(self) -> None:
        for name in self.names:
            self.socks.append(open_port(name))

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []

    # ------------------------------------------------------------------ stats

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "spec": self.spec.to_dict(),
                "settings": self.spec.canonical(), "started": self.started,
                "updated": time.time(), "ready": bool(self.socks),
                "queued": len(self.heap),
                "ports": {n: dict(imp.counters) for n, imp in zip(self.names, self.imps,
                                                                   strict=True)}}

    def _socket_drops(self) -> None:
        for sock, imp in zip(self.socks, self.imps, strict=True):
            with contextlib.suppress(OSError):
                _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                                8))
                imp.counters["socket_drops"] += drops

    def write_stats(self) -> None:
        self._socket_drops()
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(tmp, self.stats_path)

    # ------------------------------------------------------------------- loop

    def _targets(self, port: int, frame: bytes) -> tuple[int, ...]:
        n = len(self.socks)
        if n == 2:
            return (1 - port,)
        dst = frame[VNET_HDR_LEN:VNET_HDR_LEN + 6]
        self.macs[frame[VNET_HDR_LEN + 6:VNET_HDR_LEN + 12]] = port
        out = self.macs.get(dst)
        if dst[0] & 1 or out is None:
            self.imps[port].counters["flooded"] += 1
            return tuple(i for i in range(n) if i != port)
        return () if out == port else (out,)

    def _receive(self, port: int, buf: bytearray, now: float) -> None:
        sock, imp = self.socks[port], self.imps[port]
        c = imp.counters
        mv = memoryview(buf)
        for _ in range(RX_BUDGET):
            try:
                n = sock.recv_into(buf, MAX_FRAME, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if n <= VNET_HDR_LEN + 14:
                continue
            frame = bytes(mv[:n])
            c["rx_bytes"] += n - VNET_HDR_LEN
            if frame[1]:
                c["gso"] += 1
            seq, times = imp.admit(now, len(self.heap))
            if not times:
                continue
            targets = self._targets(port, frame)
            if len(times) == 2:
                self._dups[(port, seq)] = 2
            for t in times:
                if t <= now and not self.heap:
                    self._send(port, seq, targets, frame)
                else:
                    self._order += 1
                    heapq.heappush(self.heap, (t, self._order, port, seq, targets, frame))

    def _send(self, port: int, seq: int, targets: tuple[int, ...], frame: bytes) -> None:
        imp = self.imps[port]
        first = True
        key = (port, seq)
        left = self._dups.get(key)  # duplicated packets only: copies not sent yet
        if left == 2:
            self._dups[key] = 1
        elif left == 1:
            del self._dups[key]
            first = False
        imp.sent(seq, first)
        c = imp.counters
        for out in targets:
            try:
                self.socks[out].send(frame)
                c["tx_bytes"] += len(frame) - VNET_HDR_LEN
            except OSError as e:
                c["send_errors"] += 1
                log.debug("send on %s: %s", self.names[out], e)

    def _flush(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, port, seq, targets, frame = heapq.heappop(heap)
            self._send(port, seq, targets, frame)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Forward until SIGTERM/SIGINT (or `until()` is true); stats every 0.5 s."""
        if not self.socks:
            self.open()
        ep = select.epoll()
        fds = {s.fileno(): i for i, s in enumerate(self.socks)}
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        buf = bytearray(MAX_FRAME)
        next_stats = 0.0
        try:
            while not self.stopping and not (until and until()):
                now = time.monotonic()
                if now >= next_stats:
                    self.write_stats()
                    next_stats = now + STATS_INTERVAL
                timeout = min(next_stats - now, 0.1)
                if self.heap:
                    timeout = min(timeout, self.heap[0][0] - now)
                for fd, _ in ep.poll(max(timeout, 0.0)):
                    self._receive(fds[fd], buf, time.monotonic())
                self._flush(time.monotonic())
        finally:
            ep.close()
            self.write_stats()


# ----------------------------------------------------------------- process entry


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m wgx.lab.impair --ports A,B --spec SPEC [--stats FILE]` (lab-internal)."""
    args = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, str] = {}
    while args:
        key = args.pop(0)
        if key not in ("--ports", "--spec", "--stats") or not args:
            logging.basicConfig(level=logging.INFO)
            log.error("usage: python -m wgx.lab.impair --ports A,B --spec SPEC "
                      "[--stats FILE]")
            return 2
        opts[key] = args.pop(0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        spec = parse(opts.get("--spec", "")).with_seed()
        switch = Switch(opts.get("--ports", "").split(","), spec, opts.get("--stats"))
        switch.open()
    except (ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1

    def stop(_sig: int, _frame: object) -> None:
        switch.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("impairing %s: %s", ",".join(switch.names), spec.canonical())
    switch.run()
    switch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
