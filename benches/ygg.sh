# Sourced by the benchmarks that run yggdrasil (tunnel.sh, failover.sh).

# ygg_conf OUT PEERS_JSON SOCK: a fresh yggdrasil configuration (new keys) written to OUT, peering
# over TCP with PEERS_JSON (e.g. '["tcp://[fd00:1::2]:12345"]'), listening on TCP port 12345,
# admin socket SOCK, no multicast discovery, interface ygg0 with yggdrasil's largest MTU.
ygg_conf() {
    yggdrasil -genconf -json > "$1.gen"
    python3 - "$1.gen" "$1" "$2" "$3" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update({"Peers": json.loads(sys.argv[3]), "Listen": ["tcp://[::]:12345"], "AdminListen": "unix://" + sys.argv[4],
          "MulticastInterfaces": [], "IfName": "ygg0", "IfMTU": 65535})
json.dump(c, open(sys.argv[2], "w"))
PY
}
