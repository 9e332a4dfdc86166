#!/usr/bin/env bash
# Idempotent setup of a wgx host: Debian packages, kernel headers for bcc,
# and a venv (from /usr/bin/python3, with system site packages so that
# Debian's bcc is importable) with the exact versions of requirements.lock
# (`make lock` refreshes it) and wgx installed in editable mode.
#
# Usage: scripts/setup.sh            (run as root, from anywhere)
# Env:   WGX_VENV   venv directory (default: <repo>/.venv)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${WGX_VENV:-$repo/.venv}

log() { printf 'setup: %s\n' "$*" >&2; }

[[ $EUID -eq 0 ]] || { log "must run as root (it installs packages)"; exit 1; }

pkgs=(python3-bpfcc python3-venv python3-pip linux-headers-amd64 wireguard-tools
      wireguard-go iperf3 iproute2 iputils-ping procps util-linux kmod jq
      nftables ethtool tcpdump)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iperf3 asks whether to start a daemon; answer no.
    echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. There is no
# package for this kernel; Debian's newest linux-headers work for XDP programs.
kdir=/lib/modules/$(uname -r)
if [[ ! -e $kdir/build ]]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [[ -n $hdr && -n $common ]]; then
        log "linking $kdir/{build,source} to $hdr, $common"
        mkdir -p "$kdir"
        ln -sfn "$hdr" "$kdir/build"
        ln -sfn "$common" "$kdir/source"
    else
        log "warning: no Debian kernel headers found; XDP will be unavailable"
    fi
fi

if [[ ! -x $venv/bin/python ]]; then
    log "creating venv $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi

# Python packages: exactly requirements.lock, then wgx itself (editable, no deps).
# The venv sees Debian's site-packages (for bcc), which hold some of the same
# packages at other versions (cryptography, pyparsing, pygments, ...): pip installs
# the pinned version into the venv, which comes first on sys.path. lock_check
# proves it: every pin must be the version that `import` finds, and wgx must be
# this checkout. When that holds and pyproject.toml is unchanged since the last
# install, pip is not run at all.
lock=$repo/requirements.lock
[[ -f $lock ]] || { log "missing $lock (make lock writes it)"; exit 1; }
stamp=$venv/.wgx-setup-stamp
lock_check() {
    "$venv/bin/python" -P "$repo/scripts/venv_check.py" --lock "$lock" --repo "$repo" "$@"
}
want=$(sha256sum "$repo/pyproject.toml" "$lock" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(<"$stamp") == "$want" ]] && lock_check 2>/dev/null; then
    log "venv $venv already matches requirements.lock"
else
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    log "installing requirements.lock into $venv"
    "${pip[@]}" -r "$lock"
    "${pip[@]}" --no-deps -e "$repo"
    lock_check --pip-check
    echo "$want" >"$stamp"
fi
log "done: activate with 'source $venv/bin/activate'"
