#!/usr/bin/env bash
# The TLS bridge against stunnel4, same machine, same run, on loopback: a client+server pair of each
# (plain 127.0.0.1 -> mutual TLS 1.3 over [::1] -> plain 127.0.0.1), the same ECDSA P-256
# certificates, TCP_NODELAY on both, each side's default cipher suite (TLS_AES_256_GCM_SHA384 for both).
#
# 1. Throughput: iperf3 (TCP, 1 stream, SECS s) through each pair, stunnel4 and ours alternating, RUNS
#    rounds; per round the ratio, then median/min/max; also the CPU time the two bridge processes
#    used per GB carried (less sensitive to other load than Gbit/s).
# 2. New connections per second, sequential, for CONN_SECS s each:
#    - "handshake": a Python client doing mutual TLS straight to the server side (connect, handshake,
#      one byte echoed, close), with a full handshake every time ("full"), or resuming the previous
#      connection's session ("resumed"; the fraction that did resume is printed);
#    - "pair": a plain client through the whole client+server pair (connect, one byte echoed,
#      close), with session resumption on (both defaults) or off (stunnel `sessionResume = no`,
#      ours `session_resumption = false`); the resumed fraction comes from the server side's log
#      (stunnel) or counters (ours). Once with one client, once with CONC clients in parallel
#      (separate processes): one client measures latency, many measure capacity;
#    - `openssl s_time -new` and `-reuse` against each server side (handshake only, no backend).
#
#   benches/bridge.sh                 # RUNS=5 SECS=8 CONN_SECS=4 CONC=16
#
# Needs: apt-get install -y stunnel4 iperf3 openssl python3 (./scripts/test installs all but iperf3).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SECS=${SECS:-8}
CONN_SECS=${CONN_SECS:-4}
CONC=${CONC:-16}
for c in stunnel iperf3 openssl python3; do
    command -v "$c" >/dev/null || { echo "benches/bridge.sh: $c is missing: apt-get install -y stunnel4 iperf3 openssl python3" >&2; exit 1; }
done
cargo build --release --quiet --bin sixmesh
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
sleep 0.2
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

# Ports: stunnel client 2xxxx -> stunnel server [::1]:1xxxx; ours client 3xxxx -> ours server [::1]:1yyyy.
# Services: iperf (-> 5201), echo (-> 5300, resumption on), echo-nr (-> 5300, resumption off).
st_service() { # name accept connect client? resume?
    printf '[%s]\naccept = %s\nconnect = %s\ncert = %s\nkey = %s\nCAfile = %s/ca.pem\nverifyChain = yes\n' \
        "$1" "$2" "$3" "$T/$([ "$4" = yes ] && echo a || echo b).pem" "$T/$([ "$4" = yes ] && echo a || echo b).key" "$T"
    if [ "$4" = yes ]; then printf 'client = yes\ncheckIP = ::1\n'; else printf 'requireCert = yes\n'; fi
    [ "$5" = yes ] || printf 'sessionResume = no\n'
}
for side in server client; do
    {
        printf 'foreground = yes\npid =\noutput = %s/st-%s.log\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n' "$T" $side
        if [ $side = server ]; then
            st_service iperf ::1:15201 127.0.0.1:5201 no yes
            st_service echo ::1:15300 127.0.0.1:5300 no yes
            st_service echo-nr ::1:15301 127.0.0.1:5300 no no
        else
            st_service iperf 127.0.0.1:25201 ::1:15201 yes yes
            st_service echo 127.0.0.1:25300 ::1:15300 yes yes
            st_service echo-nr 127.0.0.1:25301 ::1:15301 yes no
        fi
    } > st-$side.conf
    stunnel st-$side.conf & PIDS+=($!)
    eval "ST_$side=$!"
done

sm_tunnel() { # name mode listen connect
    printf '[[tunnel]]\nname = "%s"\nmode = "%s"\nlisten = "%s"\nconnect = "%s"\n' "$@"
}
for resume in yes no; do
    for side in server client; do
        k=$([ $side = server ] && echo b || echo a)
        sfx=$([ $resume = yes ] && echo "" || echo "-nr")
        {
            [ $resume = yes ] || printf 'session_resumption = false\n'
            printf '[tls]\ncert = "%s/%s.pem"\nkey = "%s/%s.key"\nca = "%s/ca.pem"\n' "$T" $k "$T" $k "$T"
            if [ $side = server ] && [ $resume = yes ]; then
                sm_tunnel iperf server "[::1]:16201" 127.0.0.1:5201
                sm_tunnel echo server "[::1]:16300" 127.0.0.1:5300
            elif [ $side = server ]; then
                sm_tunnel echo-nr server "[::1]:16301" 127.0.0.1:5300
            elif [ $resume = yes ]; then
                sm_tunnel iperf client 127.0.0.1:35201 "[::1]:16201"
                sm_tunnel echo client 127.0.0.1:35300 "[::1]:16300"
            else
                sm_tunnel echo-nr client 127.0.0.1:35301 "[::1]:16301"
            fi
        } > sm-$side$sfx.toml
        RUST_LOG=warn "$B" bridge run --config sm-$side$sfx.toml --control "$T/sm-$side$sfx.sock" > sm-$side$sfx.log 2>&1 &
        PIDS+=($!)
        [ $resume = yes ] && eval "SM_$side=$!"
    done
done
sleep 1

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
thr() { # port server-pid client-pid -> "Gbit/s cpu-s/GB"
    local s0 c0 s1 c1 out
    s0=$(cpu_ticks "$2"); c0=$(cpu_ticks "$3")
    out=$(iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J)
    s1=$(cpu_ticks "$2"); c1=$(cpu_ticks "$3")
    python3 -c 'import json,sys
b = json.loads(sys.argv[1])["end"]["sum_received"]
gb = b["bytes"] / 1e9
print("%.3f %.3f" % (b["bits_per_second"] / 1e9, int(sys.argv[2]) / 100 / gb))' "$out" $((s1 - s0 + c1 - c0))
}
echo "throughput: iperf3 -t $SECS, $RUNS rounds, stunnel4 and sixmesh alternating"
printf '%-6s %-22s %-22s %s\n' round "stunnel4 Gbit/s cpu-s/GB" "sixmesh Gbit/s cpu-s/GB" ratio
: > thr.txt
for r in $(seq "$RUNS"); do
    read -r st stc < <(thr 25201 "$ST_server" "$ST_client")
    read -r sm smc < <(thr 35201 "$SM_server" "$SM_client")
    echo "$st $stc $sm $smc" >> thr.txt
    printf '%-6s %-8s %-13s %-8s %-13s %.2f\n' "$r" "$st" "$stc" "$sm" "$smc" "$(python3 -c "print($sm / $st)")"
done
python3 - <<'PY'
import statistics as s
rows = [list(map(float, l.split())) for l in open("thr.txt")]
ratio = [r[2] / r[0] for r in rows]
med = lambda i: s.median(r[i] for r in rows)
print(f"median: stunnel4 {med(0):.2f} Gbit/s ({med(1):.2f} cpu-s/GB), sixmesh {med(2):.2f} Gbit/s ({med(3):.2f} cpu-s/GB)")
print(f"ratio sixmesh/stunnel4: median {s.median(ratio):.2f}x, min {min(ratio):.2f}x, max {max(ratio):.2f}x; "
      f"CPU per GB: {med(3) / med(1):.2f}x of stunnel4's")
PY

cat > handshakes.py <<'PY'
import socket, ssl, sys, time
port, reuse, secs = int(sys.argv[1]), sys.argv[2] == "resumed", float(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations("ca.pem"); ctx.load_cert_chain("a.pem", "a.key")
session, n, resumed, t0 = None, 0, 0, time.time()
while time.time() - t0 < secs:
    s = socket.create_connection(("::1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = ctx.wrap_socket(s, server_hostname="::1", session=session)
    t.sendall(b"x"); t.recv(1)  # the TLS 1.3 tickets come before the echo
    resumed += t.session_reused; n += 1
    if reuse: session = t.session
    t.close()
print(f"{n / (time.time() - t0):.0f} {resumed / n:.2f}")
PY
cat > plain.py <<'PY'
import socket, sys, time
port, secs, n, failed, t0 = int(sys.argv[1]), float(sys.argv[2]), 0, 0, time.time()
while time.time() - t0 < secs:
    try:
        s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) == b"x": n += 1
        else: failed += 1
        s.close()
    except OSError:
        failed += 1
print(f"{n / (time.time() - t0):.0f} {n} {failed}")
PY
# stunnel logs a verified client certificate for full handshakes only: resumed = accepted - verified.
st_counts() { # service -> "accepted resumed"
    local a v
    a=$(grep -c "Service \[$1\] accepted connection" st-server.log || true)
    v=$(grep -c "Certificate accepted" st-server.log || true)
    echo "$a $((a - v))"
}
sm_counts() { # tunnel -> "accepted resumed" from our server side's counters
    "$B" bridge status --json --control "$T/sm-server$([ "$1" = echo-nr ] && echo -nr).sock" |
        python3 -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tunnels"] if t["name"]==sys.argv[1]][0]; print(t["accepted"], t["resumed"])' "$1"
}
pair() { # plain-port stunnel|sixmesh tunnel [clients] -> "conn/s resumed-fraction"
    local a0 r0 a1 r1 out counts=sm_counts i
    [ "$2" = stunnel ] && counts=st_counts
    read -r a0 r0 < <($counts "$3")
    out=$(for i in $(seq "${4:-1}"); do python3 plain.py "$1" "$CONN_SECS" & done; wait)
    read -r a1 r1 < <($counts "$3")
    python3 -c "import sys
rows = [l.split() for l in sys.argv[1].splitlines() if l.strip()]
failed = sum(int(r[2]) for r in rows)
if failed: print(f'{failed} connections failed', file=sys.stderr)
print(sum(int(r[0]) for r in rows), f'{($r1 - $r0) / max(1, $a1 - $a0):.2f}')" "$out"
}
echo
echo "new connections per second, sequential, ${CONN_SECS} s each (resumed: fraction that resumed)"
printf '%-36s %-20s %-20s %s\n' "" "stunnel4 conn/s res" "sixmesh conn/s res" ratio
line() { # label "st-rate st-res" "sm-rate sm-res"
    # shellcheck disable=SC2086
    set -- "$1" $2 $3
    printf '%-36s %-8s %-11s %-8s %-11s %.2f\n' "$1" "$2" "$3" "$4" "$5" "$(python3 -c "print($4 / $2)")"
}
line "handshake to the server, full" "$(python3 handshakes.py 15300 full "$CONN_SECS")" "$(python3 handshakes.py 16300 full "$CONN_SECS")"
line "handshake to the server, resumed" "$(python3 handshakes.py 15300 resumed "$CONN_SECS")" "$(python3 handshakes.py 16300 resumed "$CONN_SECS")"
line "through the pair, resumption off" "$(pair 25301 stunnel echo-nr)" "$(pair 35301 sixmesh echo-nr)"
line "through the pair, resumption on" "$(pair 25300 stunnel echo)" "$(pair 35300 sixmesh echo)"
line "pair, $CONC clients, resumption off" "$(pair 25301 stunnel echo-nr "$CONC")" "$(pair 35301 sixmesh echo-nr "$CONC")"
line "pair, $CONC clients, resumption on" "$(pair 25300 stunnel echo "$CONC")" "$(pair 35300 sixmesh echo "$CONC")"
s_time() { # port -new|-reuse -> connections/s (handshake only, no backend traffic)
    openssl s_time -connect "[::1]:$1" "$2" -time "$CONN_SECS" -cert a.pem -key a.key -CAfile ca.pem 2>/dev/null |
        awk '/connections in .* real seconds/ {printf "%.0f -\n", $1 / $4; exit}'
}
line "openssl s_time -new" "$(s_time 15300 -new)" "$(s_time 16300 -new)"
line "openssl s_time -reuse" "$(s_time 15300 -reuse)" "$(s_time 16300 -reuse)"
