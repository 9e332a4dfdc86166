"""`wgx bench --quick` end to end and `wgx bench crypto`: the output schema, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

PATHS = ["wgx-xdp", "wgx-socket", "wireguard-go", "underlay"]
TESTS = ["tcp1", "tcp4", "udp1372", "udp64", "ping", "tcp1_junk"]
METRICS = ["tcp1_gbps", "tcp4_gbps", "udp1372_kpps", "udp64_kpps", "rtt_p50_ms", "rtt_p99_ms",
           "cpu_s_per_gb", "junk_clean_tcp1_gbps", "junk_tcp1_gbps", "junk_keep_pct",
           "junk_cpu_s_per_gb", "rss_peak_mb", "pss_peak_mb"]
SAMPLE_KEYS = {"path", "test", "rep", "attempt", "seconds", "error", "cpu_s", "cpu_s_total",
               "cpu_s_per_gb", "dataplane_pids", "rss_peak_kb", "pss_peak_kb",
               "foreign_cpu_s", "foreign_limit_s", "foreign_top", "host_busy_pct",
               "disturbed", "superseded"}


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.privileged
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    t0 = time.monotonic()
    cp = subprocess.run(["wgx", "bench", "--quick", "--out", str(out)], capture_output=True,
                        text=True, timeout=290)
    elapsed = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr[-4000:]
    print(cp.stdout)
    print(f"wgx bench --quick: {elapsed:.0f}s")
    # the table went to stdout, with every path and the ratio references
    for p in PATHS:
        assert p in cp.stdout
    assert "wireguard-go" in cp.stdout and "x wg" in cp.stdout

    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "wgx-bench/1"
    assert res["config"]["quick"] is True and res["config"]["repeat"] == 1
    assert res["config"]["udp_buffer"] == "2M"
    for key in ("date", "command", "elapsed_s", "machine", "versions", "paths", "summary",
                "ratios", "samples"):
        assert key in res, key
    m = res["machine"]
    assert m["cores"] >= 1 and m["kernel"] and "cpu_model" in m
    v = res["versions"]
    for key in ("wgx", "wireguard-go", "iperf3", "python"):
        assert v.get(key), f"version of {key} missing: {v}"

    assert sorted(res["paths"]) == sorted(PATHS)
    for p, info in res["paths"].items():
        assert set(info) >= {"available", "reason", "rss_peak_kb", "pss_peak_kb"}
        assert info["available"] or info["reason"], f"{p}: unavailable without a reason"
    # the baselines have no excuse on this machine; XDP must say why if it is missing
    for p in ("wgx-socket", "wireguard-go", "underlay"):
        assert res["paths"][p]["available"], f"{p}: {res['paths'][p]['reason']}"
    live = [p for p in PATHS if res["paths"][p]["available"]]

    samples = res["samples"]
    for s in samples:
        assert set(s) >= SAMPLE_KEYS, SAMPLE_KEYS - set(s)
        assert isinstance(s["disturbed"], bool) and isinstance(s["superseded"], bool)
        if s["superseded"]:
            assert s["disturbed"], "only disturbed samples are repeated"
    for p in live:
        for t in TESTS:
            assert [s for s in samples if s["path"] == p and s["test"] == t], (p, t)
        tcp = [s for s in samples if s["path"] == p and s["test"] == "tcp1" and not s["error"]]
        assert tcp and all(s["gbps"] > 0 and s["bytes"] > 0 for s in tcp)
        udp = [s for s in samples if s["path"] == p and s["test"].startswith("udp")]
        assert any(s["probe"] for s in udp) and all("offered_pps" in s for s in udp)
        ping = [s for s in samples if s["path"] == p and s["test"] == "ping" and not s["error"]]
        assert ping and all(0 < s["rtt_p50_ms"] <= s["rtt_p99_ms"] for s in ping)
        junk = [s for s in samples if s["path"] == p and s["test"] == "tcp1_junk"
                and not s["error"]]
        assert junk and all(s["junk_sent"] > 0 for s in junk)
        clean = [s for s in samples if s["path"] == p and s["test"] == "tcp1_junk_clean"
                 and not s["error"]]
        assert clean, f"{p}: no clean twin of the junk sample"
        for s in junk:
            assert s["keep_pct"] > 0
            if len(os.sched_getaffinity(0)) >= 2:  # attacker and path on disjoint CPUs
                assert s["junk_cpus"] and s["lab_cpus"], s
                assert not set(s["junk_cpus"]) & set(s["lab_cpus"])
        if p == "underlay":
            assert all(s["cpu_s"] is None for s in samples if s["path"] == p)
        else:
            assert all(set(s["dataplane_pids"]) == {"alpha", "beta"} for s in tcp)
            assert all(s["cpu_s_total"] > 0 and s["cpu_s_per_gb"] > 0 for s in tcp)
            assert res["paths"][p]["pss_peak_kb"] > 0

    for p in PATHS:
        row = res["summary"][p]
        assert set(row) == set(METRICS)
        for cell in row.values():
            if cell is None:
                continue
            assert set(cell) >= {"median", "min", "max", "n", "values", "only_disturbed"}
            assert cell["min"] <= cell["median"] <= cell["max"]
        if p in live:
            assert row["tcp1_gbps"] and row["rtt_p50_ms"]
    assert set(res["ratios"]) == {"wireguard-go", "wgx-socket"}
    assert res["ratios"]["wireguard-go"]["wireguard-go"]["tcp1_gbps"] == pytest.approx(1.0)

    report = (out / "report.md").read_text()
    assert "wgx bench --quick" in report and "| metric |" in report
    assert "throughput.png" in report and res["date"] in report
    _png_ok(out / "throughput.png")
    _png_ok(out / "latency.png")
    # nothing left behind
    assert not [ns for ns in _namespaces() if ns.startswith("wgxb-")]
    assert not Path("/run/wgx-lab").exists() or not [
        p for p in Path("/run/wgx-lab").iterdir() if p.name.startswith("wgxb-")]


def test_bench_crypto_json() -> None:
    cp = subprocess.run(["wgx", "bench", "crypto", "--json", "--seconds", "0.05"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["schema"] == "wgx-bench-crypto/1"
    assert res["mode"] == "worker", res["mode_reason"]  # the real worker code, not a replica
    assert [r["size"] for r in res["sizes"]] == [64, 512, 1420]
    for r in res["sizes"]:
        for k in ("decrypt_pps", "decrypt_ceiling_pps", "encrypt_pps", "encrypt_ceiling_pps"):
            assert r[k] > 0, (k, r)
        s = r["samples"]
        assert all(len(v) == res["rounds"] for v in s.values())
        # rates are medians of the alternating slices, ratios the median per-slice ratio
        assert r["decrypt_pps"] == sorted(s["rx"])[res["rounds"] // 2]
        ratios = sorted(a / b for a, b in zip(s["rx"], s["c_rx"], strict=True))
        assert r["decrypt_ratio"] == pytest.approx(ratios[res["rounds"] // 2])
        ratios = sorted(a / b for a, b in zip(s["tx"], s["c_tx"], strict=True))
        assert r["encrypt_ratio"] == pytest.approx(ratios[res["rounds"] // 2])
    assert res["handshakes_per_s"]["engine"] > 0 and res["handshakes_per_s"]["noise"] > 0


def test_bench_crypto_table() -> None:
    cp = subprocess.run(["wgx", "bench", "crypto", "--seconds", "0.02"], capture_output=True,
                        text=True, timeout=120, env={"COLUMNS": "120", "PATH": _path()})
    assert cp.returncode == 0, cp.stderr
    assert "1420 B" in cp.stdout and "ceiling" in cp.stdout and "handshakes/s" in cp.stdout


def _path() -> str:
    return os.environ["PATH"]


@pytest.mark.parametrize("bad", ["2G", "-1", "lots", "02M"])
def test_bench_rejects_bad_udp_buffer(bad: str) -> None:
    cp = subprocess.run(["wgx", "bench", "--quick", "--udp-buffer", bad],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "--udp-buffer" in cp.stderr


@pytest.mark.parametrize("bad", ["-1", "lots", "4096"])
def test_bench_rejects_bad_junk_cpu(bad: str) -> None:
    cp = subprocess.run(["wgx", "bench", "--quick", "--junk-cpu", bad],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "--junk-cpu" in cp.stderr


def test_junk_placement_leaves_the_path_a_cpu() -> None:
    from wgx.lab.bench import BenchConfig

    mine = os.sched_getaffinity(0)
    assert BenchConfig(junk_cpu="off").junk_placement() is None
    place = BenchConfig(junk_cpu="auto").junk_placement()
    if len(mine) < 2:
        assert place is None
        return
    assert place == ({max(mine)}, mine - {max(mine)})
    cpu = min(mine)
    assert BenchConfig(junk_cpu=str(cpu)).junk_placement() == ({cpu}, mine - {cpu})


def test_set_affinity_pins_every_thread() -> None:
    from wgx.lab.proc import set_affinity

    mine = os.sched_getaffinity(0)
    child = subprocess.Popen(["python3", "-c", "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(30,)).start()\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2:
            assert time.monotonic() < deadline, "the child never started its thread"
            time.sleep(0.02)
        cpu = {min(mine)}
        set_affinity([child.pid], cpu)
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 2 and all(os.sched_getaffinity(t) == cpu for t in tids)
        set_affinity([child.pid, 2**22 + 1], mine)  # a pid that is gone is skipped
        assert all(os.sched_getaffinity(t) == mine for t in tids)
    finally:
        child.kill()
        child.wait()
