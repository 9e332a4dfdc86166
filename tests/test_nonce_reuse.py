"""Issue 22: churning session slots must never make a send a (key, counter) pair twice.

With the XDP dataplane, each keypair's send counter and replay window live in a
shared-memory slot.  Slots used to be handed out round-robin (1024 of them), and
every keypair takes one, also the responder keypairs of handshakes that are never
confirmed.  So a peer C whose key the attacker holds could, by sending valid
initiations within the protocol's 50/s per peer, make host a give a live session's
slot to a new keypair: the slot was zeroed, the session's send counter restarted at
0, and a sent fresh plaintext under (key, counter) pairs it had already used (nonce
reuse; b dropped those packets as replays, so the tunnel lost traffic too).

The attack, reproduced on attacklab.SwitchedLab (a, b and the attacker x on a
switch), for both dataplanes of a:
- a runs wgx-userspace, b wireguard-go; a pings b and b pings a every 20 ms for
  the whole attack, so both of a's TX paths (requests, replies) use b's session;
- a also has peer C (no endpoint); x holds C's private key and sends
  INITIATIONS fresh initiations (3x the old slot count), each from a new Engine,
  paced so that every one is accepted (a takes one per 20 ms per peer, with a
  strictly newer TAI64N timestamp; the next leaves at least GAP after the last
  one and after a's response to it);
- tcpdump on b's ul0 records every datagram a sends to b.

Asserted afterwards (all checks are evaluated and reported together):
- the harm itself: no (receiver index, counter) pair appears twice among a's
  transport packets, and both pings lost < 1 %;
- that the attack really ran: a consumed >= 3072 of C's initiations and x got
  as many responses, a never went under load, the capture is complete;
- that no keypair's counter ever went back (drop.send_counter_reused, the
  workers' drop_counter_reused): the belts behind the allocator, which revoke
  such a keypair before it reuses a nonce, never had to act;
- the daemon is alive, and for xdp: no worker restarted, the workers carried b's
  traffic (xdp.redirect_data, tx_packets), the slot allocator never refused a
  keypair and never held more than 3 slots per peer plus a few (sampled every
  second during the attack).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attacklab
import netlab
import pytest
from test_attack import ENVS, PORT_A, REPO, WGGO, WGGO_ENV, WGX
from test_fastpath import ints, wgx_get

from wgx.protocol.crypto import generate_private_key, public_key

pytestmark = pytest.mark.privileged

C_OVERLAY = "10.99.0.3/32"
C_PORT = 51999  # x's source port for C's initiations

OLD_SLOTS = 1024  # the round-robin allocator's slot count
INITIATIONS = 3200  # sent by x
MIN_CONSUMED = 3 * OLD_SLOTS  # accepted by a: the old slots went round 3 times
GAP = 0.022  # s between initiations, and between a's response and the next one
RESPONSE_WAIT = 0.25  # s x waits for a's response before sending the next anyway
ATTACK_SECONDS = 120.0  # x's time limit (the attack takes ~75 s)
PING_INTERVAL = 0.02
PING_BOUND = 10_000  # packets; ping -w bounds it in time as well
MAX_LOSS = 0.01
SLOTS_PER_PEER = 3  # current, previous, next
SLOT_SLACK = 4  # keypairs between the engine's release and the workers' acks
SNAPLEN = 128  # Ethernet + IPv4 + UDP + transport header + 16 bytes of ciphertext
CAPTURE_BOUND = 200_000  # packets tcpdump writes at most


# --------------------------------------------------------------------- x, as C

_ATTACKER = r'''
"""x plays peer C: INITIATIONS fresh initiations to a, each from a new Engine."""
import json, socket, sys, time
from wgx.protocol.engine import Engine, drain

cfg = json.loads(sys.stdin.readline())
priv = bytes.fromhex(cfg.pop("priv"))
a_pub = bytes.fromhex(cfg["a_pub"])
dst = (cfg["dst"], cfg["port"])
gap, wait = cfg["gap"], cfg["response_wait"]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((cfg["src"], cfg["sport"]))
offset = time.time() - time.monotonic()
t0 = time.monotonic()
deadline = t0 + cfg["seconds"]
sent = answered = cookies = other = 0
pending = None  # sender index of the last initiation until a answers it
last = ready = t0  # when the last initiation left; when the next may leave


def receive(timeout):
    global pending, ready, answered, cookies, other
    s.settimeout(max(timeout, 0.0002))
    try:
        data = s.recv(2048)
    except TimeoutError:
        return
    now = time.monotonic()
    if len(data) == 92 and data[0] == 2 and data[8:12] == pending:
        answered += 1
        pending = None
        # a consumed it before answering: the next must reach a more than 20 ms later.
        ready = max(ready, now + gap)
    elif data[:1] == b"\x03":
        cookies += 1
    else:
        other += 1


for _ in range(cfg["count"]):
    while time.monotonic() < deadline:
        now = time.monotonic()
        if pending is not None and now < last + wait:
            receive(last + wait - now)
        elif now < ready:
            receive(ready - now)
        else:
            break
    if time.monotonic() >= deadline:
        break
    engine = Engine(priv, wall_offset=offset)
    peer = engine.add_peer(a_pub)
    peer.endpoint = dst
    now = time.monotonic()
    engine.initiate_handshake(peer, now)
    (msg, ep), = drain(engine.datagrams)
    s.sendto(msg, ep)
    pending, last, ready = msg[4:8], now, now + gap
    sent += 1
end = time.monotonic() + wait
while pending is not None and time.monotonic() < end:
    receive(end - time.monotonic())
print(json.dumps({"sent": sent, "responses": answered, "cookie_replies": cookies,
                  "other": other, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
'''


# --------------------------------------------------------------- pcap reading

def pcap_frames(path: Path) -> Iterator[bytes]:
    """The frames of a classic pcap file (any byte order, µs or ns timestamps)."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise AssertionError(f"{path}: not a pcap file (magic {magic.hex()})")
    (linktype,) = struct.unpack_from(order + "I", data, 20)
    assert linktype == 1, f"{path}: link type {linktype}, not Ethernet"
    record = struct.Struct(order + "IIII")
    off = 24
    while off + record.size <= len(data):
        _sec, _frac, incl, _orig = record.unpack_from(data, off)
        off += record.size
        yield data[off:off + incl]
        off += incl


def transport_messages(frames: Iterator[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(receiver index, counter, first 16 ciphertext bytes) of each WireGuard type-4
    message in Ethernet/IPv4/UDP frames."""
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[14] >> 4 != 4 or f[23] != 17:
            continue
        msg = f[14 + (f[14] & 15) * 4 + 8:]
        if len(msg) >= 16 and msg[0] == 4 and msg[1:4] == b"\0\0\0":
            receiver, counter = struct.unpack_from("<IQ", msg, 4)
            yield receiver, counter, msg[16:32]


# -------------------------------------------------------------------- helpers

def counters(h: netlab.Host) -> dict[str, int]:
    """a's get=wgx integers, worker counters summed as worker.<name>."""
    out: dict[str, int] = {}
    for k, v in ints(wgx_get(h)).items():
        m = re.fullmatch(r"worker\d+\.(\w+)", k)
        key = f"worker.{m.group(1)}" if m else k
        out[key] = out.get(key, 0) + v
    return out


def ping_summary(text: str) -> dict[str, float]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert m, f"no ping summary in: {text!r}"
    sent, got = int(m.group(1)), int(m.group(2))
    return {"transmitted": sent, "received": got,
            "loss": round(1 - got / sent, 4) if sent else 1.0}


def stop_with_sigint(p: subprocess.Popen, timeout: float = 10.0) -> str:
    """SIGINT `p` (ping and tcpdump print their summary), wait; its stdout/stderr."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        netlab._terminate(p)
        return ""
    return (out or "") + (err or "")


def capture_stats(text: str) -> dict[str, int]:
    """tcpdump's exit summary: {"captured", "received by filter", "dropped by kernel"}."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(
        r"(\d+) packets? (captured|received by filter|dropped by kernel)", text)}


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    netlab.wait_until(lambda: path.exists() and text in path.read_text(errors="replace"),
                      timeout=timeout, what=f"{text!r} in {path.name}")


# ----------------------------------------------------------------------- test

@pytest.mark.slow
@pytest.mark.parametrize("dataplane", ["xdp", "socket"])
def test_handshake_churn_never_reuses_a_nonce(dataplane: str, tmp_path: Path) -> None:
    t_start = time.monotonic()
    with attacklab.SwitchedLab(span=False) as lab:
        report = _attack(lab, dataplane, tmp_path)
    report["runtime_s"] = round(time.monotonic() - t_start, 1)
    print("\nNONCE_REUSE " + json.dumps(report))
    failed = [what for what, ok in report["checks"].items() if not ok]
    assert not failed, f"failed: {failed}\n{json.dumps(report, indent=1)}"


def _attack(lab: attacklab.SwitchedLab, dataplane: str, tmp: Path) -> dict:
    a, b, x = lab.a, lab.b, lab.x
    xdp = dataplane == "xdp"
    tun = lab.tunnel(WGX, WGGO, env_a=ENVS[dataplane], env_b=WGGO_ENV, establish=True)
    assert wgx_get(a).get("dataplane") == dataplane, a.daemon_output()
    c_priv = generate_private_key()
    c_pub = public_key(c_priv)
    a.wg("set", "wg0", "peer", base64.b64encode(c_pub).decode(), "allowed-ips", C_OVERLAY)
    a_pub = base64.b64decode(a.public_key or "")

    pcap, cap_log = tmp / "a-to-b.pcap", tmp / "tcpdump.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(cap_log, "w") as log:
            cap = b.popen(["tcpdump", "-i", netlab.UNDERLAY_IF, "-n", "--immediate-mode",
                           "-U", "-Z", "root",
                           "-s", str(SNAPLEN), "-c", str(CAPTURE_BOUND), "-w", str(pcap),
                           f"udp and src host {a.underlay['v4']} and src port {PORT_A}"],
                          stdout=subprocess.DEVNULL, stderr=log)
        procs.append(cap)
        wait_for_text(cap_log, "listening on", timeout=10)

        st0 = counters(a)
        ping_secs = str(int(ATTACK_SECONDS + 30))
        pings = {
            f"{src.label}->{dst.label}": src.popen(
                ["ping", "-n", "-q", "-i", str(PING_INTERVAL), "-W", "1",
                 "-c", str(PING_BOUND), "-w", ping_secs, tun.overlay4(dst)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for src, dst in ((a, b), (b, a))
        }
        procs += pings.values()
        time.sleep(1.0)

        cfg = {"priv": c_priv.hex(), "a_pub": a_pub.hex(), "dst": a.underlay["v4"],
               "port": PORT_A, "src": attacklab.X_ADDR, "sport": C_PORT,
               "count": INITIATIONS, "gap": GAP, "response_wait": RESPONSE_WAIT,
               "seconds": ATTACK_SECONDS}
        attacker = x.popen([sys.executable, "-c", _ATTACKER], env={"PYTHONPATH": str(REPO)},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        procs.append(attacker)
        assert attacker.stdin is not None
        attacker.stdin.write(json.dumps(cfg) + "\n")
        attacker.stdin.close()
        # While x attacks: the slots a holds, sampled every second (bounded in time).
        peak = {"session_slots_live": 0, "session_slots_retiring": 0}
        t_attack = time.monotonic()
        while attacker.poll() is None and time.monotonic() - t_attack < ATTACK_SECONDS + 20:
            if xdp:
                st = counters(a)
                for k in peak:
                    peak[k] = max(peak[k], st.get(k, 0))
            time.sleep(1.0)
        try:
            attacker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            attacker.kill()
            attacker.wait(timeout=5)
        assert attacker.stdout is not None and attacker.stderr is not None
        out, err = attacker.stdout.read(), attacker.stderr.read()
        attack = json.loads(out) if out.strip() else {"error": err[-2000:]}
        time.sleep(1.0)  # the pings run on past the attack's end

        ping = {k: ping_summary(stop_with_sigint(p)) for k, p in pings.items()}
        st1 = netlab.wait_stable(lambda: counters(a), 5.0, 0.25, "a's counters")
        daemon_alive = a.daemon is not None and a.daemon.poll() is None
        time.sleep(0.5)
        cap_out = stop_with_sigint(cap)
    finally:
        for p in procs:
            netlab._terminate(p)
    cap_stats = capture_stats(cap_log.read_text(errors="replace") + cap_out)

    # Every (receiver index, counter) pair a sent to b, with the ciphertexts seen for it.
    seen: dict[tuple[int, int], list[bytes]] = {}
    packets = 0
    for receiver, counter, head in transport_messages(pcap_frames(pcap)):
        packets += 1
        seen.setdefault((receiver, counter), []).append(head)
    dups = {k: v for k, v in seen.items() if len(v) > 1}

    def d(k: str) -> int:
        return st1.get(k, 0) - st0.get(k, 0)

    peers = len(lab.wg_show_dump(a)["peers"])
    consumed = d("stat.responses_sent")
    report: dict = {
        "dataplane": dataplane,
        "attacker": attack,
        "initiations_consumed": consumed,
        "drops": {k: d(k) for k in ("drop.initiation_flood", "drop.stale_timestamp",
                                    "drop.rate_limited", "drop.no_keypair_room",
                                    "drop.send_counter_reused")},
        "cookie_replies_sent": d("stat.cookie_replies_sent"),
        "ping": ping,
        "transport_packets": packets,
        "distinct_pairs": len(seen),
        "duplicate_pairs": len(dups),
        "first_duplicates": [
            {"receiver": f"{r:08x}", "counter": c, "ciphertexts": [h.hex() for h in v]}
            for (r, c), v in list(dups.items())[:5]],
        "capture": cap_stats,
        "daemon_alive": daemon_alive,
    }
    checks = {
        "no (receiver, counter) pair sent twice": not dups,
        "capture complete": (cap_stats.get("captured", -1)
                             == cap_stats.get("received by filter")
                             and cap_stats.get("dropped by kernel") == 0),
        # ... and it holds a's echo requests and its replies to b's (the pairs checked)
        "captured a's pings": (packets >= (1 - MAX_LOSS) * (
            ping["a->b"]["transmitted"] + ping["b->a"]["received"])),
        f"ping loss < {MAX_LOSS:.0%}": all(p["loss"] < MAX_LOSS for p in ping.values()),
        f"a consumed >= {MIN_CONSUMED} initiations": consumed >= MIN_CONSUMED,
        "x got a's responses": attack.get("responses", 0) >= MIN_CONSUMED,
        "not under load": report["cookie_replies_sent"] == 0,
        "no keypair refused": report["drops"]["drop.no_keypair_room"] == 0,
        "no send counter went back": report["drops"]["drop.send_counter_reused"] == 0,
        "daemon alive": daemon_alive,
    }
    if xdp:
        slots = {k: st1.get(k) for k in ("session_slots_live", "session_slots_retiring",
                                         "session_slots_limit", "session_slots_refused")}
        report |= {
            "peers": peers,
            "session_slots": slots,
            "session_slots_peak": peak,
            "worker_restarts": st1.get("worker_restarts"),
            "xdp.redirect_data": d("xdp.redirect_data"),
            "xdp.pass_initiation": d("xdp.pass_initiation"),
            "worker.drop_counter_reused": d("worker.drop_counter_reused"),
            "worker.tx_packets": d("worker.tx_packets"),
        }
        bound = SLOTS_PER_PEER * peers + SLOT_SLACK
        checks |= {
            "session_slots_refused == 0": slots["session_slots_refused"] == 0,
            f"session slots held <= {bound}": (
                slots["session_slots_live"] is not None
                and max(peak.values()) <= bound
                and slots["session_slots_live"] + slots["session_slots_retiring"] <= bound),
            "worker_restarts == 0": st1.get("worker_restarts") == 0,
            "workers carried b's traffic": (
                d("xdp.redirect_data") >= ping["b->a"]["received"]
                and d("worker.tx_packets") >= ping["a->b"]["received"]),
            "no worker counter went back": d("worker.drop_counter_reused") == 0,
        }
    report["checks"] = checks
    return report
