#!/usr/bin/env bash
# Tunnel throughput on this machine, same run, same topology: iperf3 TCP (1 stream) between two
# network namespaces over (a) the raw veth, (b) wireguard-go, (c) yggdrasil, (d) sixmesh.
# Reports the median of RUNS runs of SECS seconds each, and sixmesh's ratio to each.
#
#   sudo benches/tunnel.sh            # RUNS=3 SECS=8 by default; needs root
#   sudo LEGS="raw sixmesh" benches/tunnel.sh   # only some paths (the others print 0)
#
# Installs nothing: apt-get install -y iperf3 wireguard-go wireguard-tools yggdrasil iproute2
# (./scripts/test installs wireguard-go and wireguard-tools, not iperf3 nor yggdrasil, which only
# the benchmarks use). Builds `sixmesh` in release mode if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/ygg.sh
RUNS=${RUNS:-3}
SECS=${SECS:-8}
LEGS=${LEGS:-raw wg ygg sixmesh}
leg() { [[ " $LEGS " == *" $1 "* ]]; }
RAW=0 WG=0 YGG=0 SIX=0
for c in iperf3 wireguard-go wg yggdrasil python3 ip; do
    command -v "$c" >/dev/null || { echo "benches/tunnel.sh: $c is missing: apt-get install -y iperf3 wireguard-go wireguard-tools yggdrasil" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "benches/tunnel.sh: needs root (network namespaces)" >&2; exit 1; }
cargo build --release --quiet
B=$PWD/target/release/sixmesh
umask 077
T=$(mktemp -d /tmp/sixmesh-tunnel-bench.XXXXXX)
P=smb$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for n in A B; do ip netns del "$P$n" 2>/dev/null || true; done
    rm -rf "$T" "/var/run/wireguard/${P}a.sock" "/var/run/wireguard/${P}b.sock"
}
trap cleanup EXIT
ns() { local n=$1; shift; ip netns exec "$P$n" "$@"; }

# Two namespaces, one veth, underlay fd00:1::1 and fd00:1::2.
for n in A B; do ip netns add "$P$n"; ip -n "$P$n" link set lo up; done
ip link add eth0 netns "${P}A" type veth peer name eth0 netns "${P}B"
ip -n "${P}A" addr add fd00:1::1/64 dev eth0 nodad
ip -n "${P}B" addr add fd00:1::2/64 dev eth0 nodad
for n in A B; do ip -n "$P$n" link set eth0 up; done

# median of RUNS iperf3 runs from A to $1 (Gbit/s)
measure() {
    local dst=$1 out=() r
    ns B iperf3 -s -B "$dst" -D -I "$T/iperf.pid" >/dev/null
    sleep 0.5
    for r in $(seq "$RUNS"); do
        out+=("$(ns A iperf3 -c "$dst" -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
        sleep 0.5
    done
    kill "$(cat "$T/iperf.pid")" 2>/dev/null || true
    sleep 0.5
    printf '%s\n' "${out[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.3f\n", a[int((NR+1)/2)]}'
}
wait_ping() { # ns dst
    for _ in $(seq 100); do ns "$1" ping -6 -c1 -W1 "$2" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "benches/tunnel.sh: no answer from $2" >&2; return 1
}

if leg raw; then
echo "raw veth..." >&2
RAW=$(measure fd00:1::2)
fi

if leg wg; then
echo "wireguard-go..." >&2
for n in A B; do wg genkey > "$T/wg$n.key"; wg pubkey < "$T/wg$n.key" > "$T/wg$n.pub"; done
i=1
for n in A B; do
    o=$([ $n = A ] && echo B || echo A); if=${P}$(echo $n | tr AB ab)
    # Background daemons are started with `ip netns exec` itself, not the `ns` function, so that
    # $! is the daemon's pid and not a subshell's.
    WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 ip netns exec "$P$n" wireguard-go -f "$if" >/dev/null 2>&1 &
    PIDS+=($!)
    sleep 0.5
    ns $n wg set "$if" private-key "$T/wg$n.key" listen-port 51000 peer "$(cat "$T/wg$o.pub")" \
        allowed-ips "fd00:2::$((3 - i))/128" endpoint "[fd00:1::$((3 - i))]:51000"
    ns $n ip -6 addr add "fd00:2::$i/64" dev "$if" nodad
    ns $n ip link set "$if" up
    i=$((i + 1))
done
wait_ping A fd00:2::2
WG=$(measure fd00:2::2)
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; PIDS=(); sleep 1
fi

if leg ygg; then
echo "yggdrasil..." >&2
for n in A B; do
    peers=$([ $n = A ] && echo '["tcp://[fd00:1::2]:12345"]' || echo '[]')
    ygg_conf "$T/ygg$n.json" "$peers" "$T/ygg$n.sock"
done
ip netns exec "${P}B" yggdrasil -useconffile "$T/yggB.json" -logto "$T/yggB.log" & PIDS+=($!)
sleep 1.5
ip netns exec "${P}A" yggdrasil -useconffile "$T/yggA.json" -logto "$T/yggA.log" & PIDS+=($!)
YB=$(yggdrasil -useconffile "$T/yggB.json" -address)
wait_ping A "$YB"
YGG=$(measure "$YB")
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; PIDS=(); sleep 1.5
fi

if leg sixmesh; then
echo "sixmesh..." >&2
ns A "$B" registry init --state-dir "$T/reg" --network fd5e:be::/48 > "$T/init.out" 2>/dev/null
FP=$(grep -o 'sha256:[0-9a-f]*' "$T/init.out" | head -1)
ip netns exec "${P}A" "$B" registry serve --state-dir "$T/reg" --listen '[::]:8443' > "$T/reg.log" 2>&1 & PIDS+=($!)
sleep 1
for n in A B; do
    tok=$(ns A "$B" registry token add --state-dir "$T/reg" 2>/dev/null | grep -oE '[A-Za-z0-9_-]{20,}' | head -1)
    ns $n "$B" join --registry 'https://[fd00:1::1]:8443' --token "$tok" --ca-fingerprint "$FP" --state-dir "$T/$n" >/dev/null 2>&1
done
i=1
for n in A B; do
    RUST_LOG=warn ip netns exec "$P$n" "$B" node run --state-dir "$T/$n" --control "$T/$n.sock" \
        --endpoint "[fd00:1::$i]:51820" > "$T/node$n.log" 2>&1 & PIDS+=($!)
    i=$((i + 1)); sleep 0.3
done
MB=$(python3 -c "import ipaddress,sys; print(ipaddress.IPv6Network(open('$T/B/prefix').read().strip())[1])")
wait_ping A "$MB"
SIX=$(measure "$MB")
fi

python3 - "$RAW" "$WG" "$YGG" "$SIX" "$RUNS" "$SECS" <<'PY'
import sys
raw, wg, ygg, six = map(float, sys.argv[1:5])
print(f"iperf3 TCP, 1 stream, median of {sys.argv[5]} x {sys.argv[6]} s, two namespaces on one veth")
print(f"{'path':<14}{'Gbit/s':>9}{'sixmesh / it':>15}")
for name, v in [("raw veth", raw), ("wireguard-go", wg), ("yggdrasil", ygg), ("sixmesh", six)]:
    print(f"{name:<14}{v:>9.3f}{six / v if v else 0:>15.2f}")
PY
