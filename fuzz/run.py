"""Run an atheris target with both a run budget and a time bound; summarise the result.

    python fuzz/run.py messages|uapi|all [--runs N] [--max-time SECONDS] [--json FILE]

The seed corpus fuzz/corpus/<target>/ is only read; inputs the fuzzer finds go to a
scratch directory (--work, default a temporary one). Crashing inputs are written to
--artifacts (default fuzz/artifacts/<target>/). The exit status is 1 if any target
crashed, 2 if a target stopped at the time bound before its run budget, else 0.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"messages": 512, "uapi": 1024}  # target -> -max_len
_STAT = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+).*?exec/s: (\d+)")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_CRASH = re.compile(r"Uncaught Python exception|ERROR: libFuzzer|deadly signal|Test unit written")


def run(target: str, runs: int, max_time: int, work: Path, artifacts: Path,
        extra_corpus: list[Path] | None = None) -> dict:
    """One libFuzzer session; returns what it printed about coverage, speed and crashes."""
    artifacts.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, str(HERE / f"fuzz_{target}.py"), str(work), str(HERE / "corpus" / target),
        *(str(p) for p in extra_corpus or []),
        f"-runs={runs}", f"-max_total_time={max_time}", f"-max_len={TARGETS[target]}",
        "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=HERE.parent)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    log = proc.stdout + proc.stderr
    stats = [m.groups() for line in log.splitlines() if (m := _STAT.match(line))]
    done = [m.groups() for line in log.splitlines() if (m := _DONE.match(line))]
    last = stats[-1] if stats else None
    crashed = proc.returncode != 0 or bool(_CRASH.search(log))
    result = {
        "target": target, "returncode": proc.returncode, "crashed": crashed,
        "runs": int(done[-1][0]) if done else (int(last[0]) if last else 0),
        "runs_requested": runs, "max_total_time": max_time,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "cov": int(last[2]) if last else None, "ft": int(last[3]) if last else None,
        "corpus": f"{last[4]}/{last[5]}" if last else None,
        "exec_per_s": int(last[6]) if last else None,
        "artifacts": sorted(str(p) for p in artifacts.iterdir()),
    }
    if crashed:
        result["log_tail"] = log[-6000:]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=[*TARGETS, "all"])
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--max-time", type=int, default=900, help="seconds per target")
    ap.add_argument("--work", type=Path, help="scratch corpus directory (default: temporary)")
    ap.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--corpus", type=Path, action="append", default=[],
                    help="an extra seed directory (read only; may be given again)")
    args = ap.parse_args()
    names = list(TARGETS) if args.target == "all" else [args.target]
    results = []
    for name in names:  # one at a time: bounded CPU
        with tempfile.TemporaryDirectory(prefix=f"wgx-fuzz-{name}-") as tmp:
            work = args.work / name if args.work else Path(tmp)
            res = run(name, args.runs, args.max_time, work, args.artifacts / name, args.corpus)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "log_tail"}), flush=True)
        if res["crashed"]:
            print(res["log_tail"], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if any(r["crashed"] for r in results):
        return 1
    if any(r["runs"] < r["runs_requested"] for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
