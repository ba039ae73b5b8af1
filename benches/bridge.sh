#!/usr/bin/env bash
# TLS bridge throughput against stunnel4, same machine, same run: iperf3 (TCP, 1 stream) through a
# client+server pair of each, mutual TLS 1.3 with the same ECDSA P-256 certificates, on loopback.
# Also: new connections per second through each pair (a TCP connect + one byte echoed, sequential).
#
#   benches/bridge.sh                 # RUNS=3 SECS=8 by default
#
# Needs: apt-get install -y stunnel4 iperf3 openssl python3 (./scripts/test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-8}
for c in stunnel iperf3 openssl python3; do
    command -v "$c" >/dev/null || { echo "benches/bridge.sh: $c is missing: apt-get install -y stunnel4 iperf3 openssl" >&2; exit 1; }
done
cargo build --release --quiet
B=$PWD/target/release/sixmesh
T=$(mktemp -d /tmp/sixmesh-bridge-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$T"; }
trap cleanup EXIT
cd "$T"
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=bench-ca" -out ca.pem 2>/dev/null
printf 'subjectAltName=IP:::1,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > ext
for n in a b; do
    openssl ecparam -name prime256v1 -genkey -noout -out $n.key
    openssl req -new -key $n.key -subj "/CN=$n" -out $n.csr 2>/dev/null
    openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile ext -out $n.pem 2>/dev/null
done

iperf3 -s -B 127.0.0.1 -p 5201 -D -I "$T/iperf.pid" >/dev/null
PIDS+=("$(cat "$T/iperf.pid")")
python3 - <<'PY' &
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 5300)); s.listen(128)
def serve(c):
    d = c.recv(1)
    if d: c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
PIDS+=($!)

# stunnel pair: client 127.0.0.1:25201 -> server [::1]:15201 -> iperf3; same for the echo.
cat > st-server.conf <<EOF
foreground = yes
pid =
output = $T/st-server.log
; like our bridge, no Nagle delay on either side (fair connection-rate numbers)
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[iperf]
accept = ::1:15201
connect = 127.0.0.1:5201
cert = $T/b.pem
key = $T/b.key
CAfile = $T/ca.pem
verifyChain = yes
requireCert = yes
[echo]
accept = ::1:15300
connect = 127.0.0.1:5300
cert = $T/b.pem
key = $T/b.key
CAfile = $T/ca.pem
verifyChain = yes
requireCert = yes
EOF
cat > st-client.conf <<EOF
foreground = yes
pid =
output = $T/st-client.log
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[iperf]
client = yes
accept = 127.0.0.1:25201
connect = ::1:15201
cert = $T/a.pem
key = $T/a.key
CAfile = $T/ca.pem
verifyChain = yes
checkIP = ::1
[echo]
client = yes
accept = 127.0.0.1:25300
connect = ::1:15300
cert = $T/a.pem
key = $T/a.key
CAfile = $T/ca.pem
verifyChain = yes
checkIP = ::1
EOF
stunnel st-server.conf & PIDS+=($!)
stunnel st-client.conf & PIDS+=($!)

# sixmesh pair: client 127.0.0.1:35201 -> server [::1]:16201 -> iperf3; echo likewise.
for side in server client; do
    k=$([ $side = server ] && echo b || echo a)
    {
        printf '[tls]\ncert = "%s/%s.pem"\nkey = "%s/%s.key"\nca = "%s/ca.pem"\n' "$T" $k "$T" $k "$T"
        if [ $side = server ]; then
            printf '[[tunnel]]\nname = "iperf"\nmode = "server"\nlisten = "[::1]:16201"\nconnect = "127.0.0.1:5201"\n'
            printf '[[tunnel]]\nname = "echo"\nmode = "server"\nlisten = "[::1]:16300"\nconnect = "127.0.0.1:5300"\n'
        else
            printf '[[tunnel]]\nname = "iperf"\nmode = "client"\nlisten = "127.0.0.1:35201"\nconnect = "[::1]:16201"\n'
            printf '[[tunnel]]\nname = "echo"\nmode = "client"\nlisten = "127.0.0.1:35300"\nconnect = "[::1]:16300"\n'
        fi
    } > sm-$side.toml
    RUST_LOG=warn "$B" bridge run --config sm-$side.toml --control "$T/sm-$side.sock" > sm-$side.log 2>&1 & PIDS+=($!)
done
sleep 1

thr() { # port -> median Gbit/s
    local out=() r
    for r in $(seq "$RUNS"); do
        out+=("$(iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
    done
    printf '%s\n' "${out[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.3f\n", a[int((NR+1)/2)]}'
}
cps() { # port -> sequential connections per second over 3 s
    python3 - "$1" <<'PY'
import socket, sys, time
port, n, t0 = int(sys.argv[1]), 0, time.time()
while time.time() - t0 < 3:
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"x"); s.recv(1); s.close(); n += 1
print(f"{n / (time.time() - t0):.0f}")
PY
}
ST=$(thr 25201); SM=$(thr 35201)
STC=$(cps 25300); SMC=$(cps 35300)
python3 - "$ST" "$SM" "$STC" "$SMC" "$RUNS" "$SECS" <<'PY'
import sys
st, sm, stc, smc = map(float, sys.argv[1:5])
print(f"iperf3 TCP 1 stream through a client+server pair, median of {sys.argv[5]} x {sys.argv[6]} s, loopback")
print(f"{'':<10}{'Gbit/s':>9}{'new conn/s':>12}")
print(f"{'stunnel4':<10}{st:>9.3f}{stc:>12.0f}")
print(f"{'sixmesh':<10}{sm:>9.3f}{smc:>12.0f}")
print(f"sixmesh / stunnel4: throughput {sm / st:.2f}x, connections {smc / stc:.2f}x")
PY
