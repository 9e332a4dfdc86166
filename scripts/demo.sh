#!/usr/bin/env bash
# The lab demo (`make demo`): two hosts, alpha and beta, as network namespaces
# joined by a 2-queue veth, each running wgx (brought up by `wgx up` from its
# own config file, XDP fast path where the NIC has it). It pings through the
# tunnel both ways, runs a 5 s iperf3 TCP test, shows both ends with
# `wgx show`, and takes everything down again (also on Ctrl-C or error).
#
# Env: DATAPLANE=auto|xdp|socket (default auto), PEER_IMPL=wgx|wireguard-go
# (what beta runs; default wgx). Nothing is added to the root namespace.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$repo/.venv/bin:$PATH"
name=wgxdemo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { wgx lab down --name "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM
[[ $EUID -eq 0 ]] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
lab() { wgx lab exec --name "$name" "$@"; }

say "wgx lab up: alpha <-> beta (dataplane ${DATAPLANE:-auto}, beta runs ${PEER_IMPL:-wgx})"
wgx lab up --name "$name" --queues 2 --dataplane "${DATAPLANE:-auto}" \
    --peer-impl "${PEER_IMPL:-wgx}"
wgx lab status --name "$name"

say "ping alpha -> beta (IPv4), beta -> alpha (IPv6)"
lab alpha -- ping -c 3 -i 0.2 -W 3 10.99.0.2
lab beta -- ping -c 3 -i 0.2 -W 3 fd99::1

say "iperf3 TCP alpha -> beta through the tunnel, 5 s"
lab beta -- iperf3 -s -1 -D
sleep 0.5
lab alpha -- timeout 30 iperf3 -c 10.99.0.2 -t 5 | tail -n 4

say "wgx show on alpha"
lab alpha -- wgx show
say "wgx show on beta"
if [[ ${PEER_IMPL:-wgx} == wgx ]]; then lab beta -- wgx show; else lab beta -- wg show; fi

say "wgx lab down"
wgx lab down --name "$name"
trap - EXIT INT TERM
