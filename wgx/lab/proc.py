"""Processes and namespaces, the way the lab needs them: bounded commands,
ownership checks by netns inode, CPU ticks and memory from /proc.

Every command has a timeout. A namespace or process is only ever touched when
it is provably the lab's: a namespace by the inode recorded when the lab made
it, a process by the namespace it lives in (and its start time, against PID
reuse).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
DEFAULT_TIMEOUT = 30.0
PF_KTHREAD = 0x00200000


class LabError(RuntimeError):
    """A lab step failed; the message says which command and why."""


def _tail(text: str, limit: int = 3000) -> str:
    text = text or ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None, env: Mapping[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run `cmd` with a timeout; LabError (with its output) on failure or timeout."""
    try:
        cp = subprocess.run(list(cmd), input=input, capture_output=True, text=True,
                            timeout=timeout, env=dict(env) if env is not None else None)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) \
            else str(e.stderr or "")
        raise LabError(f"timed out after {timeout:g}s: {' '.join(cmd)}\n{_tail(err)}") from None
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]}") from None
    if check and cp.returncode != 0:
        raise LabError(f"command failed (rc={cp.returncode}): {' '.join(cmd)}\n"
                       f"{_tail(cp.stderr.strip() or cp.stdout.strip())}")
    return cp


def run_logged(cmd: Sequence[str], log_path: str | os.PathLike[str], *,
               timeout: float = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None) -> None:
    """Run `cmd` with its output appended to a file, not a pipe.

    Daemons started by `cmd` (wireguard-go keeps its stdio when LOG_LEVEL is
    set) may hold on to their output: a pipe would never reach EOF.
    """
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None)
        except FileNotFoundError:
            raise LabError(f"command not found: {cmd[0]}") from None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    if rc != 0:
        try:
            text = Path(log_path).read_text(errors="replace")
        except OSError:
            text = ""
        what = f"timed out after {timeout:g}s" if rc is None else f"failed (rc={rc})"
        raise LabError(f"command {what}: {' '.join(cmd)}\n{_tail(text)}")


def wait_until(pred, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    """Poll pred() until truthy; LabError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ namespaces


def ns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    wanted = set(inodes)
    return [p for p in all_pids() if pid_netns_inode(p) in wanted]


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (index 0 = state), or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()


def proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def proc_starttime(pid: int) -> str | None:
    st = proc_stat(pid)
    return st[19] if st else None


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def kill_pids(pids: Iterable[int], grace: float = 3.0) -> None:
    """TERM, wait up to `grace` s, then KILL (never ourselves)."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p)]
        if pids:
            time.sleep(0.05)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


# -------------------------------------------------------------------- CPU, memory


def set_affinity(pids: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of `pids` to `cpus` (processes that are gone are skipped)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` (all its threads), in clock ticks; None if gone."""
    st = proc_stat(pid)
    return int(st[11]) + int(st[12]) if st else None


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        t = cpu_ticks(p)
        if t is not None:
            out[p] = t / HZ
    return out


def foreign_ticks(lab_inodes: Iterable[int], exclude: Iterable[int] = ()) -> dict[int, int]:
    """{pid: utime+stime+cutime+cstime} of user processes outside the lab's namespaces.

    Like the reference baseline script: kernel threads are skipped, and the
    children's times catch short-lived processes reaped meanwhile.
    """
    skip_ns = set(lab_inodes)
    skip_pid = {os.getpid(), *exclude}
    out = {}
    for pid in all_pids():
        if pid in skip_pid:
            continue
        ino = pid_netns_inode(pid)
        if ino is None or ino in skip_ns:
            continue
        st = proc_stat(pid)
        if st is None or int(st[6]) & PF_KTHREAD:
            continue
        out[pid] = int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return out


def foreign_seconds(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU-seconds burnt between two foreign_ticks() snapshots (new processes count whole)."""
    return sum(foreign_deltas(before, after).values())


def foreign_deltas(before: Mapping[int, int], after: Mapping[int, int]) -> dict[int, float]:
    """{pid: CPU-seconds} burnt between two foreign_ticks() snapshots, busiest first."""
    out = {}
    for pid, t in after.items():
        d = t - before.get(pid, 0)
        if d > 0:
            out[pid] = d / HZ
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of `pid` in kB from /proc/PID/smaps_rollup; None if gone."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        return None
    if rss is None or pss is None:
        return None
    return rss, pss


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    total = sum(vals)
    return total - vals[3] - vals[4], total
