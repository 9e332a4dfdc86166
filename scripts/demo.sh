#!/usr/bin/env bash
# Two-namespace demo: host "alpha" runs wgx, host "beta" runs Debian's
# wireguard-go, both configured with the stock `wg` tool. It pings through the
# tunnel both ways (IPv4 and IPv6), runs a 5 s iperf3 TCP test, shows both
# ends with `wg show`, and tears everything down (also on Ctrl-C or error).
#
# Underlay 198.18.0.0/24 + fd18::/64 on a veth pair, overlay 10.99.0.0/24 +
# fd99::/64; nothing is added to the root namespace. Each daemon gets a
# private /run/wireguard (a bind mount in its own mount namespace).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WGX=${WGX:-$repo/.venv/bin/wgx-userspace}
suffix=$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
A=wgxdemo-alpha-$suffix; B=wgxdemo-beta-$suffix
work=$(mktemp -d /tmp/wgxdemo.XXXXXX)
pids=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
[[ $EUID -eq 0 ]] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
mkdir -p /run/wireguard "$work/alpha" "$work/beta"

# in NS with the private UAPI dir DIR: inns NS DIR CMD...
inns() { local ns=$1 dir=$2; shift 2
    ip netns exec "$ns" unshare -m sh -c 'mount --bind "$0" /run/wireguard && exec "$@"' "$dir" "$@"; }

say "underlay: veth between $A and $B"
ip netns add "$A"; ip netns add "$B"
ip link add wgxd0 netns "$A" type veth peer name wgxd0 netns "$B"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; ip -n "$ns" link set wgxd0 up; done
ip -n "$A" addr add 198.18.0.1/24 dev wgxd0; ip -n "$A" addr add fd18::1/64 dev wgxd0 nodad
ip -n "$B" addr add 198.18.0.2/24 dev wgxd0; ip -n "$B" addr add fd18::2/64 dev wgxd0 nodad

umask 077
wg genkey > "$work/alpha.key"; wg genkey > "$work/beta.key"; wg genpsk > "$work/psk"

say "alpha: wgx-userspace wg0   beta: wireguard-go wg0"
inns "$A" "$work/alpha" env LOG_LEVEL=info "$WGX" -f wg0 > "$work/alpha.log" 2>&1 & pids+=($!)
inns "$B" "$work/beta" wireguard-go -f wg0 > "$work/beta.log" 2>&1 & pids+=($!)
for d in alpha beta; do
    for _ in $(seq 50); do [[ -S $work/$d/wg0.sock ]] && break; sleep 0.1; done
    [[ -S $work/$d/wg0.sock ]] || { echo "demo: $d daemon did not start:"; cat "$work/$d.log"; exit 1; }
done
inns "$A" "$work/alpha" wg set wg0 private-key "$work/alpha.key" listen-port 51820 \
    peer "$(wg pubkey < "$work/beta.key")" preshared-key "$work/psk" \
    endpoint 198.18.0.2:51820 allowed-ips 10.99.0.2/32,fd99::2/128
inns "$B" "$work/beta" wg set wg0 private-key "$work/beta.key" listen-port 51820 \
    peer "$(wg pubkey < "$work/alpha.key")" preshared-key "$work/psk" \
    allowed-ips 10.99.0.1/32,fd99::1/128
ip -n "$A" addr add 10.99.0.1/24 dev wg0; ip -n "$A" addr add fd99::1/64 dev wg0 nodad
ip -n "$B" addr add 10.99.0.2/24 dev wg0; ip -n "$B" addr add fd99::2/64 dev wg0 nodad
ip -n "$A" link set wg0 up; ip -n "$B" link set wg0 up

say "ping alpha -> beta (IPv4), beta -> alpha (IPv6)"
ip netns exec "$A" ping -c 3 -i 0.2 -W 3 10.99.0.2
ip netns exec "$B" ping -c 3 -i 0.2 -W 3 fd99::1

say "iperf3 TCP alpha -> beta through the tunnel, 5 s"
ip netns exec "$B" iperf3 -s -1 > /dev/null 2>&1 & pids+=($!)
sleep 0.5
ip netns exec "$A" timeout 30 iperf3 -c 10.99.0.2 -t 5 | tail -n 4

say "wg show (alpha, wgx)"
inns "$A" "$work/alpha" wg show wg0
say "wg show (beta, wireguard-go)"
inns "$B" "$work/beta" wg show wg0
say "done; tearing down"
