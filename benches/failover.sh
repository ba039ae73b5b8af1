#!/usr/bin/env bash
# Failover time after a path cut, sixmesh and yggdrasil in the same run, measured the same way.
#
# Three hosts A, B, C (namespaces) on one "internet" bridge (namespace I), underlay
# fd00:ffff::1/2/3; the sixmesh registry sits on its own host R (fd00:ffff::9), off the cut.
# Each overlay runs on A, B and C with a tunnel/peering between every pair (sixmesh: registry and
# its default network config, which keeps tunnels to all peers; yggdrasil: static TCP Peers A->B,
# A->C, B->C, multicast off, as in ../shared/reference/mesh-peers.md). For every run, both overlays are
# started fresh (yggdrasil's paths are sticky: a second cut without a restart measures nothing),
# and once A->B over the overlay is steady (20 pings, 0 % loss) and every node has its two peers,
# `ping -6 -D -i 0.05` runs from A to B's overlay address; after 1 s, the A<->B underlay is cut
# with an nftables drop in the bridge's forward hook (both directions, silent: no RST, no ICMP,
# no link down), as the namespace test `six_nodes_mesh_reroute_revoke_and_rejoin_from_cache` does.
#   failover = receive time of the first reply to a probe sent after the cut - time of the cut
#   gap      = longest gap between consecutive replies around the cut (the test's measure)
# Replies after the cut can only have gone through C (the A<->B underlay stays cut); the
# "via C" column shows C's underlay tx packets/s during 2 s after recovery (idle: ~1/s).
# A run that does not recover within TIMEOUT seconds is reported as ">TIMEOUT".
#
#   flock /tmp/sixmesh-cpu.lock bash benches/failover.sh    # RUNS=3 TIMEOUT=60 by default; root
#   RUNS=5 LEGS="sixmesh" flock /tmp/sixmesh-cpu.lock bash benches/failover.sh
#
# Installs nothing: apt-get install -y yggdrasil nftables iputils-ping iproute2.
# Builds target/release/sixmesh only if it is missing (the caller is expected to hold the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/ygg.sh
RUNS=${RUNS:-3}
TIMEOUT=${TIMEOUT:-60}
SETTLE=${SETTLE:-3}
LEGS=${LEGS:-sixmesh ygg}
leg() { [[ " $LEGS " == *" $1 "* ]]; }
echo "# RUNS=$RUNS TIMEOUT=$TIMEOUT SETTLE=$SETTLE LEGS=\"$LEGS\" flock /tmp/sixmesh-cpu.lock bash benches/failover.sh"
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?') yggdrasil $(dpkg-query -W -f '${Version}' yggdrasil 2>/dev/null || echo '?')"
for c in yggdrasil yggdrasilctl nft ping python3 ip; do
    command -v "$c" >/dev/null || { echo "benches/failover.sh: $c is missing: apt-get install -y yggdrasil nftables iputils-ping" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "benches/failover.sh: needs root (network namespaces)" >&2; exit 1; }
[ -x target/release/sixmesh ] || cargo build --release --quiet
B=$PWD/target/release/sixmesh
umask 077
T=$(mktemp -d /tmp/sixmesh-failover-bench.XXXXXX)
P=smf$$
PIDS=()
stop_pids() { # kill every daemon in PIDS and wait until each is gone (up to 10 s)
    local p i
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    [ -n "${PP:-}" ] && kill "$PP" 2>/dev/null || true
    stop_pids
    [ -n "${REG:-}" ] && kill "$REG" 2>/dev/null && sleep 0.5 || true
    for n in A B C R I; do ip netns del "$P$n" 2>/dev/null || true; done
    rm -rf "$T"
}
trap cleanup EXIT
ns() { local n=$1; shift; ip netns exec "$P$n" "$@"; }

# The "internet": bridge br0 in namespace I; hosts A, B, C (fd00:ffff::1..3) and R (::9).
ip netns add "${P}I"; ip -n "${P}I" link set lo up
ip -n "${P}I" link add br0 type bridge; ip -n "${P}I" link set br0 up
for h in A:1 B:2 C:3 R:9; do
    n=${h%:*} i=${h#*:}
    ip netns add "$P$n"; ip -n "$P$n" link set lo up
    ip link add eth0 netns "$P$n" type veth peer name "v$n" netns "${P}I"
    ip -n "${P}I" link set "v$n" master br0; ip -n "${P}I" link set "v$n" up
    ip -n "$P$n" addr add "fd00:ffff::$i/64" dev eth0 nodad
    ip -n "$P$n" link set eth0 up
done
# Bridge-netfilter hooks see bridged frames without br_netfilter: the "bridge" family.
cut_ab() {
    ns I nft -f - <<'NFT'
table bridge fcut {
  chain fw {
    type filter hook forward priority 0; policy accept;
    ip6 saddr fd00:ffff::1 ip6 daddr fd00:ffff::2 counter drop
    ip6 saddr fd00:ffff::2 ip6 daddr fd00:ffff::1 counter drop
  }
}
NFT
}
uncut_ab() { ns I nft delete table bridge fcut 2>/dev/null || true; }
txp() { ip -n "$P$1" -s -j link show eth0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["packets"])'; }

steady() { # ns dst: 20 pings at 0.1 s with no loss, within 60 s
    local i
    for i in $(seq 30); do
        ns "$1" ping -6 -n -q -c 20 -i 0.1 -W 1 "$2" 2>/dev/null | grep -q ' 0% packet loss' && return 0
        sleep 1
    done
    echo "benches/failover.sh: $1 -> $2 not steady" >&2; return 1
}

# analyse LOG T0 [final]: prints "failover gap ttl_before ttl_after" (failover "-" if not yet recovered)
analyse() {
    python3 - "$@" <<'PY'
import re, sys
log, t0 = sys.argv[1], float(sys.argv[2])
rx = []  # (receive time, send time, ttl)
for l in open(log, errors="replace"):
    m = re.match(r"\[(\d+\.\d+)\].*bytes from .*ttl=(\d+) time=([\d.]+) ms", l)
    if m:
        t, ttl, rtt = float(m[1]), int(m[2]), float(m[3]) / 1000
        rx.append((t, t - rtt, ttl))
after = [r for r in rx if r[1] > t0 and r[0] - r[1] <= 1.0]
before = [r for r in rx if r[0] <= t0]
fo = f"{after[0][0] - t0:.3f}" if after else "-"
win = [r[0] for r in rx if r[0] > t0 - 1]
if before:
    win = [before[-1][0]] + [t for t in win if t > before[-1][0]]
gaps = [b - a for a, b in zip(win, win[1:])]
if after:
    gap = f"{max(gaps):.3f}" if gaps else "-"
else:
    gap = "-"
print(fo, gap, before[-1][2] if before else "-", after[-1][2] if after else "-")
PY
}

# measure LABEL DST: one cut; appends "failover gap ttl_before ttl_after viaC_pps" to $T/LABEL.res
measure() {
    local lbl=$1 dst=$2 t0 r c0 c1 i log=$T/$1.ping.$run
    ip netns exec "${P}A" ping -6 -D -n -i 0.05 -W 1 -w $((TIMEOUT + 10)) "$dst" > "$log" 2>&1 & PP=$!
    sleep 1
    cut_ab; t0=$(date +%s.%N)
    r="- - - -"
    for i in $(seq $((TIMEOUT * 5))); do
        sleep 0.2
        r=$(analyse "$log" "$t0")
        [ "${r%% *}" != "-" ] && break
    done
    c0=$(txp C); sleep 2; c1=$(txp C)
    kill "$PP" 2>/dev/null || true; wait "$PP" 2>/dev/null || true; PP=
    ns I nft list table bridge fcut > "$T/$lbl.nft.$run" 2>&1 || true
    uncut_ab
    r=$(analyse "$log" "$t0")
    echo "$r $(( (c1 - c0) / 2 ))" >> "$T/$lbl.res"
    echo "  $lbl run $run: failover ${r%% *} s (gap, ttl before/after, C tx pkt/s: ${r#* } $(( (c1 - c0) / 2 )))" >&2
}

if leg ygg; then
    for n in A B C; do
        case $n in A) peers='["tcp://[fd00:ffff::2]:12345", "tcp://[fd00:ffff::3]:12345"]';;
                   B) peers='["tcp://[fd00:ffff::3]:12345"]';; C) peers='[]';; esac
        ygg_conf "$T/ygg$n.json" "$peers" "$T/ygg$n.sock"
    done
    YB=$(yggdrasil -useconffile "$T/yggB.json" -address)
fi

if leg sixmesh; then
    ns R "$B" registry init --state-dir "$T/reg" --network fd5e:be::/48 > "$T/init.out" 2>/dev/null
    FP=$(grep -o 'sha256:[0-9a-f]*' "$T/init.out" | head -1)
    ip netns exec "${P}R" "$B" registry serve --state-dir "$T/reg" --listen '[::]:8443' > "$T/reg.log" 2>&1 & REG=$!
    for _ in $(seq 50); do ns R ss -ltn | grep -q 8443 && break; sleep 0.2; done
    for n in A B C; do
        tok=$(ns R "$B" registry token add --state-dir "$T/reg" 2>/dev/null | grep -oE '[A-Za-z0-9_-]{20,}' | head -1)
        ns $n "$B" join --registry 'https://[fd00:ffff::9]:8443' --token "$tok" --ca-fingerprint "$FP" --state-dir "$T/$n" >/dev/null 2>&1
    done
    MB=$(python3 -c "import ipaddress,sys; print(ipaddress.IPv6Network(open('$T/B/prefix').read().strip())[1])")
fi

wait_peers() { # LABEL: every node has its 2 peers up, within 60 s
    local n k ok
    for k in $(seq 120); do
        ok=1
        for n in A B C; do
            if [ "$1" = ygg ]; then
                c=$(yggdrasilctl -json -endpoint "unix://$T/ygg$n.sock" getPeers 2>/dev/null |
                    python3 -c 'import json,sys; d=json.load(sys.stdin); p=d.get("peers", d); print(len(p))' 2>/dev/null || echo 0)
            else
                c=$(ns $n "$B" peers --json --control "$T/$n.sock" 2>/dev/null |
                    python3 -c 'import json,sys; print(sum(1 for t in json.load(sys.stdin) if t.get("up")))' 2>/dev/null || echo 0)
            fi
            [ "$c" -ge 2 ] || ok=0
        done
        [ $ok = 1 ] && return 0
        sleep 0.5
    done
    echo "benches/failover.sh: $1: not every node has 2 peers after 60 s" >&2; return 1
}

for run in $(seq "$RUNS"); do
    if leg sixmesh; then
        echo "sixmesh run $run..." >&2
        for n in C B A; do
            i=$(case $n in A) echo 1;; B) echo 2;; C) echo 3;; esac)
            RUST_LOG=info ip netns exec "$P$n" "$B" node run --state-dir "$T/$n" --control "$T/$n.sock" \
                --endpoint "[fd00:ffff::$i]:51820" > "$T/six$n.log.$run" 2>&1 & PIDS+=($!)
        done
        wait_peers sixmesh
        steady A "$MB"; sleep "$SETTLE"; steady A "$MB"
        for n in A B C; do ns $n "$B" peers --json --control "$T/$n.sock" > "$T/six$n.peers.$run" 2>&1 || true; done
        measure sixmesh "$MB"
        stop_pids
    fi
    if leg ygg; then
        echo "yggdrasil run $run..." >&2
        for n in C B A; do  # listeners first: a refused dial is retried only after 60 s
            ip netns exec "$P$n" yggdrasil -useconffile "$T/ygg$n.json" -logto "$T/ygg$n.log.$run" & PIDS+=($!)
            sleep 1.5
        done
        wait_peers ygg
        steady A "$YB"; sleep "$SETTLE"; steady A "$YB"
        yggdrasilctl -endpoint "unix://$T/yggA.sock" getPaths > "$T/ygg.paths.$run" 2>&1 || true
        measure ygg "$YB"
        stop_pids
    fi
done

if [ -n "${KEEP:-}" ]; then cp -a "$T" "$KEEP"; echo "# logs kept in $KEEP" >&2; fi

python3 - "$T" "$RUNS" "$TIMEOUT" "$LEGS" <<'PY'
import os, statistics, sys
d, runs, timeout, legs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split()
print(f"failover after a silent A<->B underlay cut (nftables drop on the bridge), 3 hosts, full mesh of")
print(f"peerings; ping -i 0.05 A->B over the overlay; {runs} fresh starts each, no recovery within {timeout:g} s = >{timeout:g}")
print(f"{'overlay':<11}{'failover_s':>11}{'min-max':>12}{'max_gap_s':>10}{'C_tx_pkt/s':>11}  runs (failover s)")
med = {}
fmt = lambda v: f">{timeout:g}" if v == float("inf") else f"{v:.2f}"
for name, lbl in [("sixmesh", "sixmesh"), ("yggdrasil", "ygg")]:
    f = os.path.join(d, lbl + ".res")
    rows = [l.split() for l in open(f)] if lbl in legs and os.path.exists(f) else []
    if not rows:
        continue
    fo = [float(r[0]) if r[0] != "-" else float("inf") for r in rows]
    gp = [float(r[1]) if r[1] != "-" else float("inf") for r in rows]
    med[name] = m = statistics.median(fo)
    print(f"{name:<11}{fmt(m):>11}{fmt(min(fo)) + '-' + fmt(max(fo)):>12}{fmt(statistics.median(gp)):>10}"
          f"{statistics.median(int(r[4]) for r in rows):>11}  {' / '.join(fmt(v) for v in fo)}")
if "sixmesh" in med and "yggdrasil" in med and med["yggdrasil"] not in (0, float("inf")):
    print(f"sixmesh / yggdrasil failover: {med['sixmesh'] / med['yggdrasil']:.2f}")
PY
