"""Check a venv for setup.sh and the Makefile; exit status 1 and one line saying why.

  venv_check.py --lock FILE --repo DIR   every pin of FILE is the version `import` finds
                                         (not an older copy in Debian's site packages),
                                         and wgx is installed from DIR
  venv_check.py --pip-check              `pip check`, for the venv's own packages only:
                                         Debian's, seen through --system-site-packages,
                                         may lack theirs (python3-gi without python3-cairo)

Run it with the venv's python (and -P, so that the current directory is not searched).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distributions, version
from importlib.util import find_spec
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_mismatches(lock: str, repo: str) -> list[str]:
    bad = []
    for line in Path(lock).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if not m:
            return [f"cannot read {lock}: {line!r}"]
        try:
            have = version(m[1])  # the first distribution on sys.path: the one `import` gets
        except PackageNotFoundError:
            have = "missing"
        if have != m[2]:
            bad.append(f"{m[1]} {have} (requirements.lock: {m[2]})")
    spec = find_spec("wgx")
    if spec is None or not (spec.origin or "").startswith(repo.rstrip("/") + "/"):
        bad.append(f"wgx not installed from {repo}")
    return bad


def pip_check_problems() -> list[str]:
    ours = {_norm(d.metadata["Name"]) for d in distributions(path=[sysconfig.get_path("purelib")])}
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if ln.split() and _norm(ln.split()[0]) in ours]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lock")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--pip-check", action="store_true")
    args = ap.parse_args()
    bad = lock_mismatches(args.lock, args.repo) if args.lock else []
    if args.pip_check:
        bad += pip_check_problems()
    if bad:
        sys.exit("venv does not match: " + "; ".join(bad))


if __name__ == "__main__":
    main()
