"""Worker RX batch path (wgx/dataplane/worker.py `Worker.rx`) on frames laid out in UMEM.

The worker is real; its rings and TUN are the stubs of `wgx bench crypto`
(wgx/lab/cryptobench.py), so every verdict can be checked per frame: what reached
the TUN, byte for byte, and which drop counter moved.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgx.dataplane import offload
from wgx.dataplane.worker import WKeypair, _parse_headers
from wgx.lab import cryptobench as cb
from wgx.lab import flood
from wgx.protocol.messages import padded_len

FRAME = cb.FRAME
MTU = cb.MTU


class _Tun:
    vnet_hdr = False

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def write(self, packet: Any) -> None:
        self.packets.append(bytes(packet))


@pytest.fixture
def rig() -> Any:
    """(worker, keypair, receive key) with a TUN stub that keeps what it is given."""
    key = os.urandom(32)
    w, kp = cb._make_worker(key, os.urandom(32))
    w.tun = _Tun()
    w.rx_key = key
    return w, kp


def _inner(src: str = "10.99.0.2", size: int = 100) -> bytes:
    """A deterministic IPv4/UDP packet of `size` bytes from `src`."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton("10.99.0.1"))
    return ip + struct.pack("!HHHH", 9, 9, size - 20, 0) + bytes(i % 251 for i in range(size - 28))


def _message(key: bytes, index: int, counter: int, plain: bytes) -> bytes:
    padded = plain + bytes(padded_len(len(plain), MTU) - len(plain))
    sealed = ChaCha20Poly1305(key).encrypt(b"\0" * 4 + counter.to_bytes(8, "little"), padded,
                                           None)
    return struct.pack("<IIQ", 4, index, counter) + sealed


def _frame(msg: bytes, outer: str = "v4", vlan: bool = False, options: int = 0) -> bytes:
    eth = b"\x02" * 12 + (b"\x81\x00\x00\x07" if vlan else b"")
    udp = struct.pack("!HHHH", 51820, 51820, 8 + len(msg), 0)
    if outer == "v4":
        ihl = 5 + options
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + 8 + len(msg), 0, 0x4000,
                         64, 17, 0, socket.inet_aton("198.18.0.2"),
                         socket.inet_aton("198.18.0.1")) + b"\x01" * (4 * options)
        return eth + b"\x08\x00" + ip + udp + msg
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(msg), 17, 64,
                      socket.inet_pton(socket.AF_INET6, "fd00::2"),
                      socket.inet_pton(socket.AF_INET6, "fd00::1"))
    return eth + b"\x86\xdd" + ip6 + udp + msg


def _run(w: Any, frames: list[bytes]) -> list[bytes]:
    """Lay `frames` out in UMEM, run one `rx()` batch, return what reached the TUN."""
    addrs, lens = [], []
    for i, f in enumerate(frames):
        w.umem.buf[i * FRAME : i * FRAME + len(f)] = np.frombuffer(f, dtype=np.uint8)
        addrs.append(i * FRAME)
        lens.append(len(f))
    w.xsk.rx = (np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.uint32))
    w.tun.packets.clear()
    w.rx()
    return list(w.tun.packets)


def _drops(w: Any) -> dict[str, int]:
    return {k: v for k, v in w.stats.items() if k.startswith("drop_") and v}


def test_in_order_batch_delivered_exactly(rig: Any) -> None:
    w, kp = rig
    inners = [_inner(size=60 + i) for i in range(64)]
    got = _run(w, [_frame(_message(w.rx_key, kp.local_index, c, p))
                   for c, p in enumerate(inners)])
    assert got == inners
    assert _drops(w) == {}
    peer = w.peers[kp.peer_id]
    assert peer.rx_data == 64 and peer.rx_source == ("198.18.0.2", 51820)
    assert kp.window.greatest == 63


def test_replays_in_batch_and_across_batches(rig: Any) -> None:
    w, kp = rig
    msgs = [_message(w.rx_key, kp.local_index, c, _inner()) for c in range(4)]
    assert len(_run(w, [_frame(m) for m in (msgs[0], msgs[1], msgs[1], msgs[2])])) == 3
    assert _drops(w) == {"drop_replay": 1}
    assert len(_run(w, [_frame(m) for m in (msgs[3], msgs[0], msgs[2])])) == 1
    assert _drops(w) == {"drop_replay": 3}


def test_forgeries_and_junk_are_counted(rig: Any) -> None:
    w, kp = rig
    good = _message(w.rx_key, kp.local_index, 0, _inner())
    flipped = bytearray(_message(w.rx_key, kp.local_index, 1, _inner()))
    flipped[40] ^= 1
    wrong_ctr = bytearray(_message(w.rx_key, kp.local_index, 2, _inner()))
    wrong_ctr[8] ^= 1  # the counter is the nonce: authentication fails
    unknown = _message(w.rx_key, kp.local_index + 1, 3, _inner())
    truncated = good[:31]
    got = _run(w, [_frame(m) for m in (bytes(flipped), good, bytes(wrong_ctr), unknown,
                                       truncated)])
    assert got == [_inner_of(good, w.rx_key)]
    assert _drops(w) == {"drop_bad_tag": 2, "drop_unknown_index": 1, "drop_malformed": 1}
    assert kp.window.greatest == 0  # forgeries never move the window


def _inner_of(msg: bytes, key: bytes) -> bytes:
    counter = struct.unpack_from("<Q", msg, 8)[0]
    plain = ChaCha20Poly1305(key).decrypt(b"\0" * 4 + counter.to_bytes(8, "little"), msg[16:],
                                          None)
    return plain[: (plain[2] << 8) | plain[3]]


def test_inner_checks(rig: Any) -> None:
    w, kp = rig
    keepalive = _message(w.rx_key, kp.local_index, 0, b"")
    spoofed = _message(w.rx_key, kp.local_index, 1, _inner(src="10.55.0.9"))
    not_ip = _message(w.rx_key, kp.local_index, 2, b"\x00" * 40)
    too_long = bytearray(_inner())
    too_long[2:4] = (2000).to_bytes(2, "big")
    lying = _message(w.rx_key, kp.local_index, 3, bytes(too_long))
    ok = _message(w.rx_key, kp.local_index, 4, _inner())
    got = _run(w, [_frame(m) for m in (keepalive, spoofed, not_ip, lying, ok)])
    assert got == [_inner()]
    assert _drops(w) == {"drop_allowedips_source": 1, "drop_bad_inner": 2}
    assert w.peers[kp.peer_id].rx_keepalive == 1


def test_header_layouts(rig: Any) -> None:
    w, kp = rig
    msgs = [_message(w.rx_key, kp.local_index, c, _inner(size=80 + c)) for c in range(4)]
    frames = [_frame(msgs[0]), _frame(msgs[1], vlan=True), _frame(msgs[2], options=2),
              _frame(msgs[3], outer="v6")]
    assert _run(w, frames) == [_inner(size=80 + c) for c in range(4)]
    assert _drops(w) == {}
    assert w.peers[kp.peer_id].rx_source == ("fd00::2", 51820)


def test_parse_headers_offsets() -> None:
    msg = bytes(range(48))
    frames = [_frame(msg), _frame(msg, vlan=True), _frame(msg, options=3),
              _frame(msg, outer="v6"), b"\x02" * 12 + b"\x08\x06" + bytes(80)]
    buf = bytearray(FRAME * len(frames))
    for i, f in enumerate(frames):
        buf[i * FRAME : i * FRAME + len(f)] = f
    addrs = np.arange(len(frames), dtype=np.uint64) * FRAME
    lens = np.array([len(f) for f in frames], dtype=np.uint32)
    oks, bodies, ends, idxs, ctrs = _parse_headers(memoryview(buf), addrs, lens)
    assert oks == [True, True, True, True, False]
    assert [b - a for b, a in zip(bodies[:4], addrs.tolist(), strict=False)] == [
        58, 62, 70, 78]
    idx, ctr = struct.unpack_from("<IQ", msg, 4)
    assert idxs[:4] == [idx] * 4 and ctrs[:4] == [ctr] * 4


def test_two_sessions_in_one_batch_and_expiry(rig: Any) -> None:
    w, kp = rig
    key2 = os.urandom(32)
    slot = w.slots.allocate()
    kp2 = WKeypair(local_index=0x0BADCAFE, slot=slot, peer_id=1,
                   receiver=ChaCha20Poly1305(key2), sender=ChaCha20Poly1305(key2),
                   remote_index=1, created=time.monotonic(), initiator=False,
                   confirmed=False, window=w.slots.window(slot))
    w.keypairs[kp2.local_index] = kp2
    frames = []
    for c in range(6):
        key, k = (w.rx_key, kp) if c % 2 else (key2, kp2)
        frames.append(_frame(_message(key, k.local_index, c, _inner(size=70 + c))))
    got = _run(w, frames)
    assert sorted(got) == sorted(_inner(size=70 + c) for c in range(6))
    assert kp2.confirmed and w._confirm == [kp2.local_index]
    kp2.created -= w.spec.reject_after_time
    assert _run(w, [_frame(_message(key2, kp2.local_index, 9, _inner()))]) == []
    assert _drops(w) == {"drop_expired": 1}


class _TxTun:
    vnet_hdr = False

    def __init__(self, packets: list[bytes]) -> None:
        self.batch = packets

    def read_batch(self, n: int) -> list[bytes]:
        got, self.batch = self.batch[:n], self.batch[n:]
        return got


def _ip_checksum_ok(header: bytes) -> bool:
    s = sum(struct.unpack("!10H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def _capture_tx(w: Any, kp: Any) -> tuple[bytes, list[tuple[int, int]]]:
    """A fresh sending key for `kp`, and the list the worker's TX submissions go to."""
    tx_key = os.urandom(32)
    kp.sender = ChaCha20Poly1305(tx_key)
    sent: list[tuple[int, int]] = []
    w.xsk.tx_submit = lambda a, ln: sent.extend(zip(map(int, a), map(int, ln), strict=True)) \
        or len(a)
    return tx_key, sent


def test_tx_batch_frames_decrypt_to_the_padded_packets(rig: Any) -> None:
    w, kp = rig
    tx_key, sent = _capture_tx(w, kp)
    sizes = [1420, 100, 101, 1419, 60, 28]
    packets = [_inner(src="10.99.0.1", size=s)[:16] + socket.inet_aton("10.99.0.2")
               + _inner(size=s)[20:] for s in sizes]
    packets.append(_inner(src="10.99.0.1", size=80)[:16] + socket.inet_aton("10.77.0.1")
                   + bytes(60))  # no peer for 10.77.0.1
    w.tun = _TxTun(packets)
    w.tx()
    assert w.stats["drop_no_peer"] == 1
    _check_sent(w, kp, tx_key, sent, packets[:-1])


def _check_sent(w: Any, kp: Any, tx_key: bytes, sent: list[tuple[int, int]],
                packets: list[bytes], first: int = 0) -> None:
    """Each submitted frame: link, IP and UDP headers right, and a transport message with
    counters first, first+1, ... that decrypts to its packet and zero padding."""
    assert len(sent) == len(packets)
    aead = ChaCha20Poly1305(tx_key)
    for k, ((addr, length), packet) in enumerate(zip(sent, packets, strict=True)):
        frame = bytes(w.umem.buf[addr : addr + length])
        ip, udp, msg = frame[14:34], frame[34:42], frame[42:]
        assert frame[:14] == w.nexthops.tpl.bytes[:14]
        assert _ip_checksum_ok(ip)
        assert struct.unpack_from("!H", ip, 2)[0] == length - 14
        assert struct.unpack_from("!H", udp, 4)[0] == len(msg) + 8
        mtype, receiver, counter = struct.unpack_from("<IIQ", msg)
        assert (mtype, receiver, counter) == (4, kp.remote_index, first + k)
        plain = aead.decrypt(b"\0" * 4 + counter.to_bytes(8, "little"), msg[16:], None)
        assert len(plain) == padded_len(len(packet), MTU)
        assert plain == packet + bytes(len(plain) - len(packet))
    assert w.slots.send_counter(kp.slot) == first + len(packets)


@pytest.mark.parametrize("size", [1400, 1401, 1420, 100])
def test_tx_equal_packets_take_the_numpy_fill_and_decrypt(rig: Any, size: int) -> None:
    """A batch of equal packets (the numpy frame fill) into frames full of stale bytes,
    twice, so counters continue and padding is rewritten."""
    w, kp = rig
    w.umem.buf[:] = 0xAA
    tx_key, sent = _capture_tx(w, kp)
    for rnd in range(2):
        packets = [_inner(src="10.99.0.1", size=size)[:16] + socket.inet_aton("10.99.0.2")
                   + bytes((i + rnd) % 256 for i in range(size - 20)) for _ in range(20)]
        w.tun = _TxTun(packets)
        sent.clear()
        w.tx()
        _check_sent(w, kp, tx_key, sent, packets, first=20 * rnd)


class _VnetTxTun(_TxTun):
    vnet_hdr = True

    def read_batch(self, n: int, max_bytes: int | None = None) -> list[bytes]:
        return super().read_batch(n)


def _offloaded_read(packet: bytes) -> bytes:
    """`packet` (IPv4/UDP) as a TUN with checksum offload gives it: NEEDS_CSUM, and the
    pseudo-header sum in the UDP checksum field."""
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(packet) - 20)
    hdr = offload.pack_vnet_hdr(offload.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
    return hdr + packet[:26] + struct.pack("!H", offload.ones_complement_sum(pseudo)) + packet[28:]


@pytest.mark.parametrize("size", [1372, 600])
def test_tx_one_udp_flow_gets_its_checksums_completed_in_the_frames(rig: Any, size: int) -> None:
    """The usual batch with the TUN's checksum offload, one UDP flow: the checksums are
    completed in the frames (`UniformBatch.fill`), and the frames decrypt to the packets
    with valid checksums; twice, into frames full of stale bytes."""
    w, kp = rig
    w.umem.buf[:] = 0xAA
    tx_key, sent = _capture_tx(w, kp)
    for rnd in range(2):
        packets = [flood.ipv4_udp_packet("10.99.0.1", 4000, "10.99.0.2", 5001,
                                         bytes((i * 7 + k + rnd) % 256 for i in range(size - 28)))
                   for k in range(20)]
        reads = [_offloaded_read(p) for p in packets]
        assert isinstance(offload.split_gso_batch(reads, MTU), offload.UniformBatch)
        w.tun = _VnetTxTun(reads)
        sent.clear()
        w.tx()
        _check_sent(w, kp, tx_key, sent, packets, first=20 * rnd)


def test_tx_one_udp_flow_to_several_destinations_takes_the_general_path(rig: Any) -> None:
    """A one-flow-shaped batch whose destinations differ is grouped per packet: those with
    a peer are sent with complete checksums, the one without is counted."""
    w, kp = rig
    tx_key, sent = _capture_tx(w, kp)
    packets = [flood.ipv4_udp_packet("10.99.0.1", 4000, "10.77.0.1" if k == 5 else "10.99.0.2",
                                     5001, bytes([k]) * 900) for k in range(12)]
    w.tun = _VnetTxTun([_offloaded_read(p) for p in packets])
    w.tx()
    assert w.stats["drop_no_peer"] == 1
    _check_sent(w, kp, tx_key, sent, packets[:5] + packets[6:])


def test_tun_read_batch_stops_at_count_or_bytes() -> None:
    """`Tun.read_batch`: one read per packet, bounded by count and by a byte budget
    (a SOCK_SEQPACKET pair stands in for the TUN fd: it keeps packet boundaries)."""
    from wgx.dataplane.tun import Tun

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    tun = Tun(a.fileno(), "stub0", vnet_hdr=True)
    try:
        for size in [1400] * 10 + [60000] * 3:
            b.send(bytes(size))
        assert [len(p) for p in tun.read_batch(4)] == [1400] * 4
        assert [len(p) for p in tun.read_batch(64, 5000)] == [1400] * 4  # 5600 >= 5000
        assert [len(p) for p in tun.read_batch(64, 100_000)] == [1400, 1400, 60000, 60000]
        assert [len(p) for p in tun.read_batch(64, 100_000)] == [60000]
        assert tun.read_batch(64, 100_000) == []
    finally:
        a.close()
        b.close()


def test_seen_counters_are_dropped_before_decryption(rig: Any) -> None:
    """As in the engine: a counter the window holds is a replay whatever its ciphertext,
    so a replay flood costs no AEAD call (the flipped copy below would fail its tag)."""
    w, kp = rig
    msgs = [_message(w.rx_key, kp.local_index, c, _inner()) for c in range(3)]
    assert len(_run(w, [_frame(m) for m in msgs])) == 3
    flipped = bytearray(msgs[1])
    flipped[-1] ^= 1
    assert _run(w, [_frame(bytes(flipped)), _frame(msgs[2])]) == []
    assert _drops(w) == {"drop_replay": 2}


@pytest.mark.parametrize(("uso", "count"), [(True, 40), (False, 40), (True, 31)])
def test_write_tun_coalesces_udp_only_if_the_tun_took_uso(uso: bool, count: int) -> None:
    """`_write_tun` merges a UDP run into one USO write only if the TUN took USO and
    the batch is large enough to pay for the merge; else one write per datagram."""
    from types import SimpleNamespace

    from wgx.dataplane import offload
    from wgx.dataplane.tun import Tun
    from wgx.dataplane.worker import Worker

    flags = offload.TUN_TCP_OFFLOADS | (offload.TUN_UDP_OFFLOADS if uso else 0)
    assert Tun(-1, "x", vnet_hdr=True, offloads=flags).uso is uso
    assert Tun(-1, "x", vnet_hdr=False, offloads=flags).uso is False
    writes: list[bytes] = []
    tun = SimpleNamespace(vnet_hdr=True, uso=uso, write_vnet=lambda b: writes.append(bytes(b)))
    dgrams = []
    for _ in range(count):  # DF, UDP checksum 0 ("none"), a valid IPv4 header checksum
        d = bytearray(_inner(size=1000))
        words = sum(struct.unpack("!10H", bytes(d[:20])))
        while words >> 16:
            words = (words & 0xFFFF) + (words >> 16)
        struct.pack_into("!H", d, 10, ~words & 0xFFFF)
        dgrams.append(bytes(d))
    fake = SimpleNamespace(_rx_out=[memoryview(d) for d in dgrams], tun=tun)
    Worker._write_tun(fake)  # type: ignore[arg-type]
    assert fake._rx_out == []
    if uso and count >= offload.UDP_COALESCE_MIN_BATCH:
        assert len(writes) == 1
        h = offload.parse_vnet_hdr(writes[0])
        assert h.gso_type == offload.VIRTIO_NET_HDR_GSO_UDP_L4 and h.gso_size == 972
        segs = [bytes(s) for s in offload.split_gso_batch(writes, 1420)]
        assert [s[28:] for s in segs] == [d[28:] for d in dgrams]
    else:
        assert writes == [offload.VNET_ZERO + d for d in dgrams]


def test_frame_reused_with_another_layout_and_sizes(rig: Any) -> None:
    """The per-frame views are cached by the body's end: a frame slot that comes back
    with another header layout ending at the same byte, or with another length, must
    still decrypt and deliver exactly."""
    w, kp = rig
    full = [_inner(size=MTU) for _ in range(3)]  # no padding: the decrypted views go out
    got = _run(w, [_frame(_message(w.rx_key, kp.local_index, c, p))
                   for c, p in enumerate(full)])
    assert got == full
    # slot 0 again, same frame end, the message 12 bytes further in (a VLAN tag and
    # IPv4 options) and 12 bytes shorter
    short = _inner(size=MTU - 12)
    frame = _frame(_message(w.rx_key, kp.local_index, 3, short), vlan=True, options=2)
    assert len(frame) == len(_frame(_message(w.rx_key, kp.local_index, 0, full[0])))
    assert _run(w, [frame]) == [short]
    mixed = [_inner(size=s) for s in (MTU, 100, MTU, 33)]
    got = _run(w, [_frame(_message(w.rx_key, kp.local_index, 4 + c, p))
                   for c, p in enumerate(mixed)])
    assert got == mixed
    assert _drops(w) == {}
    assert len(w._views) <= 2 * 4  # bounded by the frames and lengths seen


def test_tx_batch_to_one_unknown_destination_is_counted(rig: Any) -> None:
    """The one-destination fast path drops (and counts) a batch nobody's allowed IPs hold."""
    w, _ = rig
    packets = [_inner(src="10.99.0.1", size=200)[:16] + socket.inet_aton("10.77.0.1")
               + bytes(180) for _ in range(12)]
    w.tun = _TxTun(packets)
    w.xsk.tx_submit = lambda a, ln: pytest.fail("nothing may be sent")
    w.tx()
    assert w.stats["drop_no_peer"] == 12


def test_reports_only_what_changed(rig: Any) -> None:
    """An idle worker sends no report (no daemon wakeup every 50 ms); traffic, a
    keypair confirmation or a changed counter each make one."""
    w, kp = rig
    sent: list[tuple] = []
    w.report = type("Pipe", (), {"send": staticmethod(sent.append)})()
    w.flush_report()
    assert len(sent) == 1  # the first report carries the counters
    w.flush_report()
    w.flush_report()
    assert len(sent) == 1  # nothing changed: nothing sent
    w.stats["rx_batches"] += 1
    w.flush_report()
    assert len(sent) == 2 and sent[-1][5]["rx_batches"] == w.stats["rx_batches"]
    w._confirm.append(kp.local_index)
    w.flush_report()
    assert len(sent) == 3 and sent[-1][3] == [kp.local_index]
    w.peers[1].rx_bytes += 100
    w.flush_report()
    assert len(sent) == 4 and sent[-1][2][1][0] == 100
    w.flush_report()
    assert len(sent) == 4


class _Report:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)


def test_tx_never_sends_a_counter_twice_when_its_slot_goes_back(rig: Any) -> None:
    """The worker's belt (issue 22): a slot whose send counter went back under a live
    keypair (it was reset for another) must not make the worker reuse a nonce."""
    w, kp = rig
    _, sent = _capture_tx(w, kp)
    w.report = _Report()
    packets = [_inner(src="10.99.0.1", size=100)[:16] + socket.inet_aton("10.99.0.2")
               + bytes(80) for _ in range(10)]
    w.tun = _TxTun(list(packets))
    w.tx()
    assert len(sent) == 10 and kp.sent_below == 10
    w.slots.set_send_counter(kp.slot, 3)  # what a reused slot did to the live keypair
    sent.clear()
    w.tun = _TxTun(list(packets))
    w.tx()
    assert sent == []
    assert w.stats["drop_counter_reused"] == 10
    assert kp.local_index not in w.keypairs and w.peers[1].current is None
    assert w.report.sent == [("revoked", w.spec.index, kp.local_index)]


def test_a_keypair_whose_slot_was_handed_on_neither_sends_nor_receives(rig: Any) -> None:
    """The owner tag (issue 22): once the daemon gave the slot to another keypair, the
    worker's stale copy of the old one is refused by the slot, on TX and on RX."""
    w, kp = rig
    kp.tag = w.slots.tag(kp.slot)
    w.report = _Report()
    w.slots.retire(kp.slot, 1, kp.tag)
    w.slots.settle(1)
    assert w.slots.allocate() == kp.slot and w.slots.tag(kp.slot) != kp.tag
    _, sent = _capture_tx(w, kp)
    w.tun = _TxTun([_inner(src="10.99.0.1", size=100)[:16] + socket.inet_aton("10.99.0.2")
                    + bytes(80)])
    w.tx()
    assert sent == [] and w.stats["drop_counter_reused"] == 1
    assert w.report.sent == [("revoked", w.spec.index, kp.local_index)]
    w.keypairs[kp.local_index] = kp  # as if the revocation had not reached it yet
    w.tun = _Tun()
    assert _run(w, [_frame(_message(w.rx_key, kp.local_index, 0, _inner()))]) == []
    assert _drops(w) == {"drop_counter_reused": 1, "drop_expired": 1}
    assert kp.local_index not in w.keypairs
