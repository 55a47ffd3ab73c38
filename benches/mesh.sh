#!/usr/bin/env bash
# Data-plane benchmark, one run, same machine: an app (nginx returning a small JSON), nginx as a
# plain reverse proxy in front of it, one Castellan sidecar (the client presents the orders SVID
# over mTLS to inventory's sidecar: authn + authz → app), a sidecar pair (plain HTTP into orders'
# outbound listener → mTLS → inventory's sidecar → app: two Castellan hops), and gateway →
# sidecar (TLS at the edge, API key, context token, mTLS, decision at both). Max throughput with
# oha and wrk (wrk cannot present a client certificate), fixed 1,000 rps latency with oha, proxy
# RSS during the fixed-rate run.
#
#   cargo build --release -p castellan && benches/mesh.sh [SECONDS]
# Needs: nginx, wrk (Debian), oha (cargo install oha).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
B="${CARGO_TARGET_DIR:-/var/tmp/castellan-target}/release/castellan"
T="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -p "$T/nginx" -c nginx.conf -s stop 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT

mkdir -p "$T/nginx/logs"
cat > "$T/nginx/nginx.conf" <<NGINX
worker_processes auto;
error_log $T/nginx/logs/error.log;
pid $T/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:18080; keepalive 64; }
  server { listen 127.0.0.1:18080; location / { default_type application/json; return 200 '{"ok":true}'; } }
  server { listen 127.0.0.1:18081; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
nginx -p "$T/nginx" -c nginx.conf

CASTELLAN_LOG=warn "$B" server init --trust-domain demo.castellan --data-dir "$T/cp" -o json > "$T/init.json"
CASTELLAN_LOG=warn "$B" server run --data-dir "$T/cp" --listen 127.0.0.1:0 2>"$T/cp.log" & PIDS+=($!)
for _ in $(seq 100); do [ -f "$T/cp/server.json" ] && break; sleep 0.1; done
export CASTELLAN_SERVER="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["url"])' "$T/cp/server.json")"
export CASTELLAN_TOKEN="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["admin_token"])' "$T/init.json")"
export CASTELLAN_CA_BUNDLE="$T/cp/bundle.pem"
join() { "$B" service add "$@" -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["join_token"])'; }
J_ORD=$(join orders); J_INV=$(join inventory); J_GW=$(join gateway --kind gateway --route /orders=orders --dns 127.0.0.2)
# WITH_LIMIT=1: also a RateLimit on every /orders call (generous, so it counts but never refuses),
# to measure what a limit check costs on the gateway path.
mkdir -p "$T/policies" && cp examples/demo/policies/*.yaml "$T/policies/"
if [ "${WITH_LIMIT:-0}" = 1 ]; then
  cat > "$T/policies/bench-limit.yaml" <<YAML
apiVersion: castellan/v1
kind: RateLimit
metadata: {name: bench-orders-per-user}
spec: {service: orders, key: user, rate: 1000000, per: 1s, burst: 1000000, pathPrefixes: [/orders]}
YAML
fi
"$B" policy apply "$T/policies" >/dev/null
KEY=$("$B" apikey create --user alice --roles customer --claim customer_id=42 -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["api_key"])')

proxy() { CASTELLAN_LOG=warn "$B" proxy run "$@" 2>>"$T/proxies.log" & PIDS+=($!); }
proxy --mode sidecar --id inventory-1 --join-token "$J_INV" --state-dir "$T/inv" --listen 127.0.0.1:18443 --admin-listen 127.0.0.1:18501 --app 127.0.0.1:18080
INV_PID=${PIDS[-1]}
proxy --mode sidecar --id orders-1 --join-token "$J_ORD" --state-dir "$T/ord" --listen 127.0.0.1:18444 --admin-listen 127.0.0.1:18502 --app 127.0.0.1:18080 --upstream inventory=127.0.0.1:18090
ORD_PID=${PIDS[-1]}
proxy --mode gateway --id gateway-1 --join-token "$J_GW" --state-dir "$T/gw" --listen 127.0.0.2:18445 --admin-listen 127.0.0.1:18503 --route /orders=orders
GW_PID=${PIDS[-1]}
for port in 18501 18502 18503; do
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
done
# Endpoints are pushed after the sidecars report; wait until both paths answer 200.
for _ in $(seq 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18090/items/7)" = 200 ] && break; sleep 0.05; done
for _ in $(seq 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CASTELLAN_CA_BUNDLE" -H "Authorization: Bearer $KEY" https://127.0.0.2:18445/orders/42)" = 200 ] && break; sleep 0.05; done

cat > "$T/auth.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

declare -A URL=(
  [app]="http://127.0.0.1:18080/items/7"
  [nginx]="http://127.0.0.1:18081/items/7"
  [sidecar]="https://127.0.0.1:18443/items/7"
  [sidecar-pair]="http://127.0.0.1:18090/items/7"
  [gateway+sidecar]="https://127.0.0.2:18445/orders/42"
)
echo "| path | oha max rps (32 conns, ${SECS}s) | wrk max rps (1 thread, 32 conns) | oha @1000 rps p50 | p99 | non-2xx | proxy RSS at 1000 rps |"
echo "|---|---:|---:|---:|---:|---:|---|"
for name in ${ROWS:-app nginx sidecar sidecar-pair gateway+sidecar}; do
  url="${URL[$name]}"
  auth=(); wrkauth=()
  if [ "$name" = "gateway+sidecar" ]; then auth=(-H "Authorization: Bearer $KEY"); wrkauth=(-s "$T/auth.lua"); fi
  if [ "$name" = "sidecar" ]; then auth=(--cert "$T/ord/svid.pem" --key "$T/ord/svid.key"); fi
  max=$(oha -z "${SECS}s" -c 32 --no-tui --insecure --output-format json "${auth[@]}" "$url" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["summary"]["requestsPerSec"]))')
  if [ "$name" = "sidecar" ]; then rps="n/a"; else rps=$(wrk -t1 -c32 -d"${SECS}s" "${wrkauth[@]}" "$url" | awk '/Requests\/sec/ {print int($2)}'); fi
  oha -q 1000 -z "${SECS}s" -c 32 --latency-correction --no-tui --insecure --output-format json "${auth[@]}" "$url" > "$T/oha.json" &
  OHA=$!
  sleep "$(( SECS / 2 ))"
  rss="-"
  mem() { echo "$(( $(ps -o rss= -p "$1") / 1024 )) MB (anon $(( $(awk '/RssAnon/ {print $2}' /proc/"$1"/status) / 1024 )) MB)"; }
  case "$name" in
    sidecar) rss="inventory $(mem "$INV_PID")" ;;
    sidecar-pair) rss="orders $(mem "$ORD_PID"), inventory $(mem "$INV_PID")" ;;
    gateway+sidecar) rss="gateway $(mem "$GW_PID"), orders $(mem "$ORD_PID")" ;;
    nginx) rss="nginx workers $(ps -o rss= -C nginx | awk '{s+=$1} END {print int(s/1024)}') MB (all)" ;;
  esac
  wait "$OHA"
  read -r p50 p99 bad < <(python3 - "$T/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
lp = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
print(f"{lp['p50']*1000:.2f}ms {lp['p99']*1000:.2f}ms {bad}")
PY
)
  echo "| $name | $max | $rps | $p50 | $p99 | $bad | $rss |"
done
