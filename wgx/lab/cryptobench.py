"""`wgx bench crypto`: the worker's batch crypto path against the bare AEAD ceiling.

In one process, no sockets:

* worker RX: `Worker.rx()` of wgx/dataplane/worker.py itself, on batches of
  256 transport messages laid out in a fake UMEM (Ethernet/IPv4/UDP/WireGuard
  frames) -- batch header parse, keypair lookup, `decrypt_into` frame -> arena,
  the shared replay window, the allowed-IPs source check, the TUN hand-off
  (a counting stub);
* worker TX: `Worker.tx()` on batches of 64 plaintext packets from a stub
  TUN -- allowed-IPs lookup, counter reservation, the header template,
  `encrypt_into` from the packet into UMEM frames, the TX ring (a stub);
* ceiling: the bare `cryptography` ChaCha20Poly1305 `decrypt_into` /
  `encrypt_into` loop over the same sizes with precomputed nonces -- what
  any Python dataplane pays at least per packet.

If the worker's internals changed so that it cannot be driven with the stubs,
the "replica" mode times the same per-packet calls the worker makes (nonce
build, `decrypt_into`/`encrypt_into` between a numpy buffer and an arena) and says so.

Handshakes per second: initiation + response + its consumption, both through
two `wgx.protocol.engine.Engine`s (the daemon's code path: MACs, cookies,
timers, index table) and through bare `wgx.protocol.noise`.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgx.dataplane.xsk import as_list
from wgx.lab.flood import ipv4_udp_packet

SIZES = (64, 512, 1420)
MTU = 1420
FRAME = 2048
HDR = 14 + 20 + 8  # Ethernet + IPv4 + UDP in front of the WireGuard message
_NONCE0 = b"\x00" * 4


def _inner_packet(size: int, src: str = "10.99.0.2", dst: str = "10.99.0.1") -> bytes:
    """An IPv4/UDP packet of exactly `size` bytes (>= 28), checksums valid (a TUN
    with offloads would not merge datagrams that fail them)."""
    return ipv4_udp_packet(src, 9, dst, 9, os.urandom(size - 28))


# ------------------------------------------------------------------- stubs


class _Umem:
    def __init__(self, frames: int) -> None:
        self.buf = np.zeros(frames * FRAME, dtype=np.uint8)
        self._mv = memoryview(self.buf)
        self._free = list(range(0, frames * FRAME, FRAME))

    def alloc(self, n: int) -> np.ndarray:
        got, self._free = self._free[:n], self._free[n:]
        return np.array(got, dtype=np.uint64)

    def free(self, addrs: Any) -> None:
        self._free.extend(addrs.tolist() if isinstance(addrs, np.ndarray) else addrs)


class _Xsk:
    def __init__(self) -> None:
        self.rx: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        self.done: list[int] = []
        self.sent = 0

    def rx_peek(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        a, ln = self.rx
        return a[:n], ln[:n]

    def rx_release(self, n: int) -> None:
        pass

    def fill(self, addrs: Any) -> None:
        pass

    def tx_submit(self, addrs: Any, lens: Any) -> int:
        self.done.extend(as_list(addrs))
        self.sent += len(addrs)
        return len(addrs)

    def kick(self) -> None:
        pass

    def complete(self) -> np.ndarray:
        done, self.done = self.done, []
        return np.array(done, dtype=np.uint64)


class _Tun:
    vnet_hdr = False

    def __init__(self) -> None:
        self.written = 0
        self.batch: list[bytes] = []

    def write(self, packet: Any) -> None:
        self.written += 1

    def read_batch(self, n: int, max_bytes: int | None = None) -> list[bytes]:
        return self.batch[:n]


class _NextHops:
    def __init__(self, tpl: Any) -> None:
        self.tpl = tpl

    def header(self, endpoint: Any, now: float | None = None) -> Any:
        return self.tpl


# ------------------------------------------------------------------ worker path


def _make_worker(rx_key: bytes, tx_key: bytes) -> tuple[Any, Any]:
    """A real `Worker` whose sockets, rings and TUN are stubs; returns (worker, keypair)."""
    import ipaddress
    import socket

    from wgx.dataplane.nexthop import Template
    from wgx.dataplane.sessions import SessionSlots
    from wgx.dataplane.worker import WKeypair, Worker, WorkerSpec, WPeer

    w = object.__new__(Worker)
    w.spec = WorkerSpec(0, "stub0", 0, "stub0", 51820, MTU, 180.0, 2**60)
    w.slots = SessionSlots(8)
    w._init_state()
    slot = w.slots.allocate()
    kp = WKeypair(local_index=0x11223344, slot=slot, peer_id=1,
                  receiver=ChaCha20Poly1305(rx_key), sender=ChaCha20Poly1305(tx_key),
                  remote_index=0x55667788, created=time.monotonic(), initiator=True,
                  confirmed=True, window=w.slots.window(slot))
    w.keypairs[kp.local_index] = kp
    w.peers[1] = WPeer(1, endpoint=("198.18.0.2", 51820), current=kp)
    w.allowed.insert(ipaddress.ip_network("10.99.0.0/24"), 1)
    w.umem = _Umem(1024)
    w.xsk = _Xsk()
    w.tun = _Tun()
    w._arena = None
    w.nexthops = _NextHops(Template(b"\x02" * 6, b"\x02\x00\x00\x00\x00\x01",
                                    socket.inet_aton("198.18.0.1"),
                                    socket.inet_aton("198.18.0.2"), 51820, 51820))
    w.raw4 = w.raw6 = None
    w.link_mtu = 1500
    return w, kp


def _rx_frames(w: Any, kp: Any, key: bytes, size: int, n: int) -> tuple[np.ndarray, ...]:
    """Lay out n encrypted transport frames in the worker's UMEM; returns (addrs, lens, copy)."""
    from wgx.protocol.messages import padded_len

    aead = ChaCha20Poly1305(key)
    packet = _inner_packet(size)
    plen = padded_len(size, MTU)
    plain = packet + bytes(plen - size)
    addrs, lens = [], []
    for i in range(n):
        a = i * FRAME
        sealed = aead.encrypt(_NONCE0 + i.to_bytes(8, "little"), plain, None)
        msg = struct.pack("<IIQ", 4, kp.local_index, i) + sealed
        eth = b"\x02" * 12 + b"\x08\x00"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(msg), 0, 0x4000, 64, 17, 0,
                         b"\xc6\x12\x00\x02", b"\xc6\x12\x00\x01")
        udp = struct.pack("!HHHH", 51820, 51820, 8 + len(msg), 0)
        frame = eth + ip + udp + msg
        w.umem.buf[a : a + len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        addrs.append(a)
        lens.append(len(frame))
    return (np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.uint32),
            w.umem.buf[: n * FRAME].copy())


def _worker_rx_rate(size: int, seconds: float) -> float:
    from wgx.dataplane.worker import RX_BATCH

    key = os.urandom(32)
    w, kp = _make_worker(key, os.urandom(32))
    addrs, lens, pristine = _rx_frames(w, kp, key, size, RX_BATCH)
    w.xsk.rx = (addrs, lens)
    spent, packets, deadline = 0.0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline or packets == 0:
        # fresh ciphertext and a fresh replay window for every batch (outside the clock)
        w.umem.buf[: len(pristine)] = pristine
        w.slots.retire(kp.slot, 0)
        w.slots.settle(0)
        kp.slot = w.slots.allocate()
        kp.window = w.slots.window(kp.slot)
        before = w.tun.written
        t0 = time.perf_counter()
        w.rx()
        spent += time.perf_counter() - t0
        got = w.tun.written - before
        if got != len(addrs):
            raise RuntimeError(f"worker rx delivered {got}/{len(addrs)} packets: "
                               f"{dict(w.stats)}")
        packets += got
    return packets / spent


def _worker_tx_rate(size: int, seconds: float) -> float:
    from wgx.dataplane.worker import TX_BATCH

    w, _kp = _make_worker(os.urandom(32), os.urandom(32))
    w.tun.batch = [_inner_packet(size, src="10.99.0.1", dst="10.99.0.2")] * TX_BATCH
    spent, packets, deadline = 0.0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline or packets == 0:
        before = w.xsk.sent
        t0 = time.perf_counter()
        w.tx()
        spent += time.perf_counter() - t0
        got = w.xsk.sent - before
        if got != TX_BATCH:
            raise RuntimeError(f"worker tx sent {got}/{TX_BATCH} packets: {dict(w.stats)}")
        packets += got
    return packets / spent


# ----------------------------------------------------------------- replica path


def _replica_rates(size: int, seconds: float) -> tuple[float, float]:
    """The worker's per-packet calls alone: nonce build + AEAD from a numpy buffer into an
    arena (RX) and from the packet into the buffer (TX), never in place."""
    from wgx.protocol.messages import padded_len

    key = os.urandom(32)
    aead = ChaCha20Poly1305(key)
    plen = padded_len(size, MTU)
    n = 256
    buf = np.zeros(n * FRAME, dtype=np.uint8)
    mv = memoryview(buf)
    plain = _inner_packet(size) + bytes(plen - size)
    for i in range(n):
        sealed = aead.encrypt(_NONCE0 + i.to_bytes(8, "little"), plain, None)
        buf[i * FRAME + HDR + 16 : i * FRAME + HDR + 16 + len(sealed)] = np.frombuffer(
            sealed, np.uint8)
    arena = memoryview(bytearray(n * FRAME))
    spent, packets, deadline = 0.0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline or packets == 0:
        t0 = time.perf_counter()
        for i in range(n):
            start = i * FRAME + HDR + 16
            aead.decrypt_into(_NONCE0 + i.to_bytes(8, "little"), mv[start : start + plen + 16],
                              None, arena[start : start + plen])
        spent += time.perf_counter() - t0
        packets += n
    rx = packets / spent
    spent, packets, deadline = 0.0, 0, time.monotonic() + seconds
    counter = 0
    while time.monotonic() < deadline or packets == 0:
        t0 = time.perf_counter()
        for i in range(n):
            start = i * FRAME + HDR + 16
            aead.encrypt_into(_NONCE0 + counter.to_bytes(8, "little"), plain, None,
                              mv[start : start + plen + 16])
            counter += 1
        spent += time.perf_counter() - t0
        packets += n
    return rx, packets / spent


# ---------------------------------------------------------------------- ceiling


def _ceiling_rates(size: int, seconds: float) -> tuple[float, float]:
    """Bare decrypt_into / encrypt_into loops with precomputed nonces and buffers."""
    from wgx.protocol.messages import padded_len

    aead = ChaCha20Poly1305(os.urandom(32))
    plen = padded_len(size, MTU)
    n = 256
    nonces = [_NONCE0 + i.to_bytes(8, "little") for i in range(n)]
    plain = bytearray(_inner_packet(size) + bytes(plen - size))
    cts = [bytearray(aead.encrypt(nc, bytes(plain), None)) for nc in nonces]
    out = bytearray(plen)
    sealed = bytearray(plen + 16)
    dec = aead.decrypt_into
    enc = aead.encrypt_into

    def loop(fn: Callable[[], None]) -> float:
        spent, packets, deadline = 0.0, 0, time.monotonic() + seconds
        while time.monotonic() < deadline or packets == 0:
            t0 = time.perf_counter()
            fn()
            spent += time.perf_counter() - t0
            packets += n
        return packets / spent

    def rx() -> None:
        for nc, ct in zip(nonces, cts, strict=True):
            dec(nc, ct, None, out)

    def tx() -> None:
        for nc in nonces:
            enc(nc, plain, None, sealed)

    return loop(rx), loop(tx)


# ------------------------------------------------------------------- handshakes


def _engine_handshakes(seconds: float) -> float:
    from wgx.protocol.crypto import generate_private_key, public_key
    from wgx.protocol.engine import Engine

    ka, kb = generate_private_key(), generate_private_key()
    a, b = Engine(ka), Engine(kb)
    pa, pb = a.add_peer(public_key(kb)), b.add_peer(public_key(ka))
    pa.endpoint, pb.endpoint = ("198.18.0.2", 51820), ("198.18.0.1", 51820)
    now, done, spent, last = 1000.0, 0, 0.0, None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or done == 0:
        now += 10.0  # past every rate limit and the TAI64N whitening
        a.datagrams.clear()
        b.datagrams.clear()
        t0 = time.perf_counter()
        a.initiate_handshake(pa, now)
        init = a.datagrams[0][0]
        b.receive_datagram(init, ("198.18.0.1", 51820), now)
        resp = b.datagrams[0][0]
        a.receive_datagram(resp, ("198.18.0.2", 51820), now)
        spent += time.perf_counter() - t0
        if pa.current is None or pa.current is last:
            raise RuntimeError(f"handshake did not complete: {dict(a.drops)} {dict(b.drops)}")
        last = pa.current
        done += 1
    return done / spent


def _noise_handshakes(seconds: float) -> float:
    from wgx.protocol import noise
    from wgx.protocol.crypto import generate_private_key, public_key

    ka, kb = generate_private_key(), generate_private_key()
    pub_b = public_key(kb)
    psk = bytes(32)
    done, spent = 0, 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or done == 0:
        ea, eb = generate_private_key(), generate_private_key()
        t0 = time.perf_counter()
        e, s, p, st_a = noise.create_initiation(ka, pub_b, ea, b"\0" * 12)
        _, st_b = noise.consume_initiation(kb, e, s, p)
        e2, p2, _keys_b = noise.create_response(st_b, eb, psk)
        noise.consume_response(st_a, ka, e2, p2, psk)
        spent += time.perf_counter() - t0
        done += 1
    return done / spent


# -------------------------------------------------------------------------- run


ROUNDS = 5


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _measure(size: int, seconds: float, mode: str, rounds: int) -> dict[str, Any]:
    """One size: worker and ceiling measured in alternating slices, medians of `rounds`.

    Interleaving keeps a noisy neighbour from landing on one side of a ratio only.
    """
    slice_s = seconds / rounds
    samples: dict[str, list[float]] = {k: [] for k in ("rx", "tx", "c_rx", "c_tx")}
    for _ in range(rounds):
        if mode == "worker":
            rx, tx = _worker_rx_rate(size, slice_s), _worker_tx_rate(size, slice_s)
        else:
            rx, tx = _replica_rates(size, slice_s)
        c_rx, c_tx = _ceiling_rates(size, slice_s)
        for k, v in (("rx", rx), ("tx", tx), ("c_rx", c_rx), ("c_tx", c_tx)):
            samples[k].append(v)
    rx, tx = _median(samples["rx"]), _median(samples["tx"])
    return {
        "size": size,
        "decrypt_pps": rx, "decrypt_ceiling_pps": _median(samples["c_rx"]),
        "decrypt_ratio": _median([a / b for a, b in zip(samples["rx"], samples["c_rx"],
                                                         strict=True)]),
        "encrypt_pps": tx, "encrypt_ceiling_pps": _median(samples["c_tx"]),
        "encrypt_ratio": _median([a / b for a, b in zip(samples["tx"], samples["c_tx"],
                                                         strict=True)]),
        "decrypt_gbps": rx * size * 8 / 1e9, "encrypt_gbps": tx * size * 8 / 1e9,
        "samples": samples,
    }


def run(seconds: float = 0.5, sizes: tuple[int, ...] = SIZES,
        rounds: int = ROUNDS) -> dict[str, Any]:
    """Measure everything; returns the JSON-able result (rates in packets/s).

    Each rate is the median of `rounds` slices of `seconds / rounds`, the worker's
    and the ceiling's alternating; each ratio is the median of the per-slice ratios.
    """
    mode = "worker"
    reason = None
    try:
        _worker_rx_rate(64, 0.01)
        _worker_tx_rate(64, 0.01)
    except Exception as e:  # the stubs no longer fit the worker: time its calls instead
        mode, reason = "replica", f"{type(e).__name__}: {e}"
    rows = [_measure(size, seconds, mode, rounds) for size in sizes]
    import cryptography

    return {
        "schema": "wgx-bench-crypto/1",
        "mode": mode,
        "mode_reason": reason,
        "seconds_per_point": seconds,
        "rounds": rounds,
        "batch": {"rx": 256, "tx": 64},
        "cryptography": cryptography.__version__,
        "sizes": rows,
        "handshakes_per_s": {
            "engine": _engine_handshakes(seconds),
            "noise": _noise_handshakes(seconds),
        },
    }
