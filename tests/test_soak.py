"""Soak: 30 minutes of mixed traffic through wgx (XDP, 2 workers) against wireguard-go.

Host a runs wgx-userspace with the rekey limits shrunk through the test-only
WGX_TEST_REKEY_AFTER_TIME / WGX_TEST_REKEY_AFTER_MESSAGES, so keypairs turn
over every few seconds of traffic instead of every two minutes; host b runs
wireguard-go. Cycles of TCP transfers both ways (sha256-checked), IPv4 and
IPv6 ping bursts and idle gaps (keepalives, expiring keys) repeat until the
time is up. Each cycle samples the PSS (smaps_rollup) and open fds of the
daemon and its workers.

Holds, after a warm-up: no process gains fds, no worker died or was
replaced, every transfer arrived intact, keys really turned over (one
handshake per 4 x REKEY_AFTER_TIME at least), and the peer is not stuck at the
end (a fresh handshake, pings through), and the memory the three processes own
grows by at most 10%: the proportional share (PSS) of their anonymous and
shared-memory pages. Their file-backed pages (the interpreter's and libraries'
code) are shared with every other process that maps the same files, so their
share moves whenever an unrelated process starts or exits (the daemon's went
from 14.2 to 6.9 MB between two samples 10 s apart, its RSS unchanged); total
PSS is reported alongside. See docs/reliability.md ("Soak") for the copy-on-write
growth this once caught.

WGX_SOAK_SECONDS overrides the 1800 s (for a quick local run); the figures
are written to the file named by WGX_SOAK_REPORT, if set.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import netlab
import pytest
from test_fastpath import WGGO, WGGO_ENV, WGX, XDP_ENV, ints, wgx_get, worker_pids

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("WGX_SOAK_SECONDS", "1800"))
REKEY_AFTER_TIME = 15
REKEY_AFTER_MESSAGES = 20_000  # about 28 MB of full-size packets
MIB = 1 << 20
GROWTH_MAX = 1.10


def _rollup_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup (Pss, Pss_Anon, Pss_Shmem, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sample(pids: list[int]) -> dict[str, Any]:
    rollups = {p: _rollup_kb(p) for p in pids}
    pss = {p: r["Pss"] for p, r in rollups.items()}
    owned = {p: r["Pss_Anon"] + r["Pss_Shmem"] for p, r in rollups.items()}
    return {"t": time.monotonic(), "pss_kb": sum(pss.values()), "pss_by_pid": pss,
            "owned_kb": sum(owned.values()), "owned_by_pid": owned,
            "fds": {p: _fds(p) for p in pids}}


@pytest.mark.timeout(SOAK_SECONDS + 600)
def test_soak_mixed_traffic_with_fast_rekeys() -> None:
    env = dict(XDP_ENV, WGX_TEST_REKEY_AFTER_TIME=str(REKEY_AFTER_TIME),
               WGX_TEST_REKEY_AFTER_MESSAGES=str(REKEY_AFTER_MESSAGES))
    with netlab.Lab() as lab:
        lab.tunnel(WGX, WGGO, env_a=env, env_b=WGGO_ENV, establish=True)
        a, b = lab.a, lab.b
        st = wgx_get(a)
        assert st["dataplane"] == "xdp", st
        daemon, workers = int(st["pid"]), worker_pids(st)
        assert len(workers) == 2, st
        pids = [daemon, *workers]
        start = time.monotonic()
        deadline = start + SOAK_SECONDS
        warmup = start + min(180.0, SOAK_SECONDS / 6)
        samples: list[dict[str, Any]] = []
        handshakes: set[int] = set()
        moved = cycles = 0
        while time.monotonic() < deadline:
            cycles += 1
            size = (8 + 8 * (cycles % 4)) * MIB  # 8..32 MiB, more than one rekey's worth
            for src, dst in ((a, b), (b, a)):
                res = lab.tcp_transfer_sha256(src, dst, lab.OVERLAY4[dst.label], size,
                                              timeout=120)
                assert res.sha256_sent == res.sha256_received, (cycles, src, res)
                moved += size
            lab.ping(a, lab.OVERLAY4["b"], count=20, interval=0.05)
            lab.ping(b, lab.OVERLAY6["a"], count=20, interval=0.05)
            handshakes.add(lab.peer_stats(a)["latest_handshake"])
            time.sleep(3 if cycles % 5 else REKEY_AFTER_TIME + 5)  # now and then: idle
            samples.append(_sample(pids))
        st = wgx_get(a)
        assert int(st["pid"]) == daemon and worker_pids(st) == workers, st
        lab.ping(a, lab.OVERLAY4["b"], count=3)
        final = lab.peer_stats(a)
        assert time.time() - final["latest_handshake"] < REKEY_AFTER_TIME + 15, final

    warm = [s for s in samples if s["t"] >= warmup]
    assert len(warm) >= 6, f"only {len(warm)} samples after the warm-up"
    base_pss = statistics.median(s["pss_kb"] for s in warm[:3])
    end_pss = statistics.median(s["pss_kb"] for s in warm[-3:])
    base_owned = statistics.median(s["owned_kb"] for s in warm[:3])
    end_owned = statistics.median(s["owned_kb"] for s in warm[-3:])
    report = {
        "seconds": SOAK_SECONDS, "cycles": cycles, "bytes_moved": moved,
        "handshakes_seen": len(handshakes),
        "owned_kb_after_warmup": base_owned, "owned_kb_end": end_owned,
        "owned_kb_max": max(s["owned_kb"] for s in warm), "growth": end_owned / base_owned,
        "owned_by_pid_after_warmup": warm[0]["owned_by_pid"],
        "owned_by_pid_end": warm[-1]["owned_by_pid"],
        "pss_kb_after_warmup": base_pss, "pss_kb_end": end_pss,
        "pss_kb_max": max(s["pss_kb"] for s in warm), "pss_growth": end_pss / base_pss,
        "pss_by_pid_after_warmup": warm[0]["pss_by_pid"],
        "pss_by_pid_end": warm[-1]["pss_by_pid"],
        "fds_after_warmup": warm[0]["fds"], "fds_end": warm[-1]["fds"],
        "wgx_stats": {k: v for k, v in ints(st).items() if k.startswith(("stat.", "drop."))},
    }
    out = os.environ.get("WGX_SOAK_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    assert warm[-1]["fds"] == warm[0]["fds"], report
    assert len(handshakes) >= SOAK_SECONDS / (REKEY_AFTER_TIME * 4), report
    assert end_owned <= GROWTH_MAX * base_owned, report
