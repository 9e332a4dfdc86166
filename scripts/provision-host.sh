#!/usr/bin/env bash
# provision-host.sh - the per-host provisioning step of a wgx lab, shared by the
# netns lab (`wgx lab up`, one call per namespace) and the Vagrantfile (one call
# per VM), so both build the same topology with the same code.
#
#   scripts/provision-host.sh HOST [options]
#
# Steps, all idempotent:
#   1. keys: every host of the lab gets a key pair in LAB_DIR/keys (made by the
#      first host that needs them, under a lock; the lab dir is shared between
#      the hosts: a directory for namespaces, the synced folder for VMs);
#   2. config: LAB_DIR/HOST/IFACE.conf, a wg-quick config with the overlay
#      address of HOST and its peers (mesh: every other host; hub: the first
#      host is the hub and forwards between the spokes);
#   3. up: `wgx up` (or wg-quick with wireguard-go) -- or `down`.
#
# Addressing (host i = position in --hosts, from 1):
#   underlay  198.18.0.(OFFSET+i)/24, fd18::(OFFSET+i)/64   (made by the caller)
#   overlay   10.99.0.i/24, fd99::i/64                     (made here)
#
# Options:
#   --lab-dir DIR          keys and configs (default /etc/wgx-lab)
#   --hosts "alpha beta"   all hosts of the lab, in order (default "alpha beta")
#   --topology mesh|hub    (default mesh)
#   --underlay-offset N    (default 0; the Vagrantfile uses 10: .1 is the VM host's)
#   --impl wgx|wireguard-go|none   (default wgx; none: keys and config only)
#   --dataplane auto|xdp|socket    (wgx only; default auto)
#   --netns NS             the host is network namespace NS (netns lab)
#   --uapi-dir DIR         private /run/wireguard for this host (bind mount in a
#                          private mount namespace; the UAPI path is global)
#   --state-dir DIR        private /run/wgx for this host (wgx's undo records)
#   --iface NAME           tunnel interface (default wg0)
#   --port N               listen port (default 51820)
#   --action up|down|config        (default up)
# Env: WGX (the wgx command), and everything wgx-userspace reads
#      (WGX_XDP_IFACE, WGX_WORKERS, WGX_TUN_OFFLOAD, LOG_LEVEL) is passed through.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { printf 'provision-host: %s\n' "$*" >&2; exit 1; }
log() { printf 'provision-host: %s\n' "$*" >&2; }

host=${1:-}
[[ -n $host && $host != -* ]] || die "usage: $0 HOST [--lab-dir DIR] [--hosts 'a b'] [--impl wgx|wireguard-go] ..."
shift
lab_dir=/etc/wgx-lab hosts="alpha beta" topology=mesh offset=0 impl=wgx dataplane=auto
netns="" uapi_dir="" state_dir="" iface=wg0 port=51820 action=up
while (($#)); do
    case $1 in
        --lab-dir) lab_dir=$2 ;;
        --hosts) hosts=$2 ;;
        --topology) topology=$2 ;;
        --underlay-offset) offset=$2 ;;
        --impl) impl=$2 ;;
        --dataplane) dataplane=$2 ;;
        --netns) netns=$2 ;;
        --uapi-dir) uapi_dir=$2 ;;
        --state-dir) state_dir=$2 ;;
        --iface) iface=$2 ;;
        --port) port=$2 ;;
        --action) action=$2 ;;
        *) die "unknown option $1" ;;
    esac
    shift 2 || die "option $1 needs a value"
done
case $topology in mesh|hub) ;; *) die "--topology $topology: use mesh or hub" ;; esac
case $impl in wgx|wireguard-go|none) ;; *) die "--impl $impl: use wgx, wireguard-go or none" ;; esac
case $action in up|down|config) ;; *) die "--action $action: use up, down or config" ;; esac
[[ $offset =~ ^[0-9]+$ && $port =~ ^[0-9]+$ ]] || die "--underlay-offset and --port are numbers"

read -r -a all <<<"$hosts"
index=0
for i in "${!all[@]}"; do [[ ${all[$i]} == "$host" ]] && index=$((i + 1)); done
((index)) || die "host $host is not in --hosts '$hosts'"
((${#all[@]} + offset < 255)) || die "too many hosts for one /24"

if [[ -z ${WGX:-} ]]; then
    WGX=$(command -v wgx || true)
    for c in "$repo/.venv/bin/wgx" /opt/wgx-venv/bin/wgx; do
        [[ -n $WGX ]] && break
        [[ -x $c ]] && WGX=$c
    done
fi
genkey() { if [[ -n ${WGX:-} ]]; then "$WGX" genkey; else wg genkey; fi; }
pubkey() { if [[ -n ${WGX:-} ]]; then "$WGX" pubkey; else wg pubkey; fi; }

conf=$lab_dir/$host/$iface.conf

# Run a command as this host: in its netns (if any; `ip netns exec` also gives it the
# namespace's /sys), with its private /run/wireguard and /run/wgx (if any). wgx runs
# inside the host, as on a VM, and keeps its undo records in that private /run/wgx.
as_host() {
    local pre=()
    [[ -n $netns ]] && pre=(ip netns exec "$netns")
    if [[ -n $uapi_dir || -n $state_dir ]]; then
        "${pre[@]}" unshare -m sh -c '
            if [ -n "$0" ]; then mount --bind "$0" /run/wireguard || exit 1; fi
            if [ -n "$1" ]; then mount --bind "$1" /run/wgx || exit 1; fi
            shift; exec "$@"' "$uapi_dir" "$state_dir" "$@"
    else
        "${pre[@]}" "$@"
    fi
}

if [[ $action == down ]]; then
    [[ -f $conf ]] || { log "$host: no $conf, nothing to bring down"; exit 0; }
    case $impl in
        wgx) as_host "$WGX" down "$conf" ;;
        wireguard-go) as_host wg-quick down "$conf" ;;
        none) ;;
    esac
    exit 0
fi

# 1. keys for every host (once; whoever comes first makes them all)
umask 077
mkdir -p "$lab_dir/keys" "$lab_dir/$host"
(
    flock -w 30 9 || die "cannot lock $lab_dir/keys"
    for h in "${all[@]}"; do
        if [[ ! -s $lab_dir/keys/$h.key ]]; then
            genkey > "$lab_dir/keys/$h.key.tmp"
            mv "$lab_dir/keys/$h.key.tmp" "$lab_dir/keys/$h.key"
        fi
        [[ -s $lab_dir/keys/$h.pub ]] || pubkey < "$lab_dir/keys/$h.key" > "$lab_dir/keys/$h.pub"
    done
) 9> "$lab_dir/keys/.lock"

# 2. the host's wg-quick config
peer_block() {  # peer_block NAME INDEX ALLOWED
    printf '\n[Peer]\n# %s\nPublicKey = %s\nEndpoint = 198.18.0.%d:%d\nAllowedIPs = %s\n' \
        "$1" "$(<"$lab_dir/keys/$1.pub")" $((offset + $2)) "$port" "$3"
}
# A hub spoke routes the whole overlay to the hub (AllowedIPs); its own address is
# a host route then, else the connected /24 would collide with that route.
p4=24 p6=64
[[ $topology == hub && ${#all[@]} -gt 2 && $index -gt 1 ]] && p4=32 p6=128
{
    printf '# %s: written by scripts/provision-host.sh (%s topology)\n' "$host" "$topology"
    printf '[Interface]\nPrivateKey = %s\nAddress = 10.99.0.%d/%d, fd99::%d/%d\nListenPort = %d\n' \
        "$(<"$lab_dir/keys/$host.key")" "$index" "$p4" "$index" "$p6" "$port"
    if [[ $topology == hub && $index == 1 && ${#all[@]} -gt 2 ]]; then
        # the hub routes between spokes, back out of the same tunnel
        printf 'PostUp = sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.conf.all.send_redirects=0\n'
    fi
    for i in "${!all[@]}"; do
        j=$((i + 1)) name=${all[$i]}
        ((j == index)) && continue
        if [[ $topology == hub && ${#all[@]} -gt 2 ]]; then
            if ((index == 1)); then
                peer_block "$name" "$j" "10.99.0.$j/32, fd99::$j/128"
            elif ((j == 1)); then
                peer_block "$name" "$j" "10.99.0.0/24, fd99::/64"
            fi
        else
            peer_block "$name" "$j" "10.99.0.$j/32, fd99::$j/128"
        fi
    done
} > "$conf.tmp"
mv "$conf.tmp" "$conf"
log "$host: wrote $conf"
[[ $action == config || $impl == none ]] && exit 0

# 3. bring the tunnel up
[[ -z $uapi_dir ]] || mkdir -p /run/wireguard  # the bind-mount targets
[[ -z $state_dir ]] || mkdir -p /run/wgx "$state_dir"
if as_host ip link show dev "$iface" >/dev/null 2>&1; then
    # provisioning again (e.g. `vagrant provision`): take the old tunnel down first
    log "$host: $iface exists, taking it down first"
    case $impl in
        wgx) as_host "$WGX" down "$conf" || true ;;
        wireguard-go) as_host wg-quick down "$conf" || true ;;
    esac
fi
case $impl in
    wgx)
        [[ -n ${WGX:-} ]] || die "wgx not found (set WGX=/path/to/wgx)"
        as_host "$WGX" up "$conf" --dataplane "$dataplane"
        ;;
    wireguard-go)
        as_host env WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick up "$conf"
        ;;
esac
log "$host: $iface is up ($impl)"
