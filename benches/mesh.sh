#!/usr/bin/env bash
# Data-plane benchmark against nginx, side by side in one run (issue 11).
#
# Rows, each with its peer class:
#   nginx → app                          plain reverse proxy (reference)
#   nginx mTLS → app                     nginx terminating mTLS, client certificate verified
#   castellan sidecar → app              mTLS, SVID check, decision, audit record
#   nginx edge TLS → nginx mTLS → app    two nginx hops: TLS at the edge, mTLS between them
#   castellan gateway → sidecar → app    TLS, API key, decision, context token, audit, mTLS,
#                                        context check, decision, audit
# Every TLS key is P-256: the nginx rows use the very SVIDs Castellan issued (server: inventory's
# or the gateway's; client: orders'), verified against the same bundle.
#
# The systems under test (nginx instances with one worker each, Castellan proxies) run on core 0;
# the load generator (oha), the app (nginx, one worker) and the control plane run on core 1. Per
# row: max req/s (oha, 32 connections, SECS seconds), CPU µs per request of the system under
# test (utime+stime of its processes from /proc/PID/stat ÷ requests completed, in the max run),
# p50/p99/p99.9 at a fixed 1,000 req/s (latency-corrected), RSS of its processes during that run.
#
#   cargo build --profile dist -p castellan && benches/mesh.sh [SECONDS]
#   BIN=path/to/castellan benches/mesh.sh        # another build
#   ROWS="sidecar nginx-mtls" benches/mesh.sh    # some rows
#   PERF=/tmp/mesh ROWS=sidecar benches/mesh.sh  # and a perf profile of each row's SUT
# Needs: nginx (Debian), oha (cargo install oha), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
TGT="${CARGO_TARGET_DIR:-/var/tmp/castellan-target}"
B="${BIN:-$TGT/dist/castellan}"
[ -x "$B" ] || B="$TGT/release/castellan"
[ -x "$B" ] || { echo "no castellan binary: cargo build --profile dist -p castellan" >&2; exit 1; }
# The proxies run as the proxy-only binary when it was built next to castellan (fewer resident
# pages); PROXY_BIN=same runs them as `castellan proxy run`.
PB="${PROXY_BIN:-$(dirname "$B")/castellan-proxy}"
if [ "$PB" = same ] || [ ! -x "$PB" ]; then PROXY=("$B" proxy run); else PROXY=("$PB" run); fi
command -v oha >/dev/null || { echo "oha missing: cargo install oha" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx missing: apt-get install nginx" >&2; exit 1; }
T="$(mktemp -d)"
PIDS=()
NGINXES=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in "${NGINXES[@]}"; do nginx -p "$T/$n" -c nginx.conf -s stop 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT
SUT="taskset -c 0"
GEN="taskset -c 1"

CASTELLAN_LOG=warn $GEN "$B" server init --trust-domain demo.castellan --data-dir "$T/cp" -o json > "$T/init.json"
CASTELLAN_LOG=warn $GEN "$B" server run --data-dir "$T/cp" --listen 127.0.0.1:0 2>"$T/cp.log" & PIDS+=($!)
for _ in $(seq 100); do [ -f "$T/cp/server.json" ] && break; sleep 0.1; done
json() { python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
export CASTELLAN_SERVER="$(json "$T/cp/server.json" url)"
export CASTELLAN_TOKEN="$(json "$T/init.json" admin_token)"
export CASTELLAN_CA_BUNDLE="$T/cp/bundle.pem"
join() { "$B" service add "$@" -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["join_token"])'; }
J_ORD=$(join orders); J_INV=$(join inventory --dns inventory.mesh); J_GW=$(join gateway --kind gateway --route /orders=orders --dns 127.0.0.2)
mkdir -p "$T/policies" && cp examples/demo/policies/*.yaml "$T/policies/"
"$B" policy apply "$T/policies" >/dev/null
KEY=$("$B" apikey create --user alice --roles customer --claim customer_id=42 -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["api_key"])')

proxy() { CASTELLAN_LOG=warn $SUT "${PROXY[@]}" "$@" 2>>"$T/proxies.log" & PIDS+=($!); }
proxy --mode sidecar --id inventory-1 --join-token "$J_INV" --state-dir "$T/inv" --listen 127.0.0.1:18443 --admin-listen 127.0.0.1:18501 --app 127.0.0.1:18080
INV_PID=${PIDS[-1]}
proxy --mode sidecar --id orders-1 --join-token "$J_ORD" --state-dir "$T/ord" --listen 127.0.0.1:18444 --admin-listen 127.0.0.1:18502 --app 127.0.0.1:18080 --upstream inventory=127.0.0.1:18090
ORD_PID=${PIDS[-1]}
proxy --mode gateway --id gateway-1 --join-token "$J_GW" --state-dir "$T/gw" --listen 127.0.0.2:18445 --admin-listen 127.0.0.1:18503 --route /orders=orders
GW_PID=${PIDS[-1]}
for port in 18501 18502 18503; do
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
done

# nginx: the app (core 1), and the peers (core 0): "hop" terminates mTLS (and proxies plainly for
# the reference row), "edge" terminates TLS and calls "hop" over mTLS with orders' SVID.
ngx() { # name cpu config-body
  mkdir -p "$T/$1/logs"
  cat > "$T/$1/nginx.conf" <<NGINX
worker_processes 1;
error_log $T/$1/logs/error.log;
pid $T/$1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  $3
}
NGINX
  taskset -c "$2" nginx -p "$T/$1" -c nginx.conf
  NGINXES+=("$1")
}
ngx app 1 "server { listen 127.0.0.1:18080 reuseport backlog=4096; location / { default_type application/json; return 200 '{\"ok\":true}'; } }"
ngx hop 0 "
  upstream app { server 127.0.0.1:18080; keepalive 64; }
  server { listen 127.0.0.1:18081; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }
  server {
    listen 127.0.0.1:18082 ssl;
    ssl_certificate $T/inv/svid.pem; ssl_certificate_key $T/inv/svid.key;
    ssl_client_certificate $T/cp/bundle.pem; ssl_verify_client on; ssl_verify_depth 3;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
ngx edge 0 "
  upstream hop { server 127.0.0.1:18082; keepalive 64; }
  server {
    listen 127.0.0.2:18083 ssl;
    ssl_certificate $T/gw/svid.pem; ssl_certificate_key $T/gw/svid.key;
    location / {
      proxy_pass https://hop; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_ssl_certificate $T/ord/svid.pem; proxy_ssl_certificate_key $T/ord/svid.key;
      proxy_ssl_trusted_certificate $T/cp/bundle.pem; proxy_ssl_verify on;
      proxy_ssl_name inventory.mesh; proxy_ssl_session_reuse on;
    }
  }"
nginx_pids() { local m; m=$(cat "$T/$1/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }

# Endpoints are pushed after the sidecars report; wait until the paths answer 200.
for _ in $(seq 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CASTELLAN_CA_BUNDLE" -H "Authorization: Bearer $KEY" https://127.0.0.2:18445/orders/42)" = 200 ] && break; sleep 0.05; done

declare -A URL=(
  [nginx]="http://127.0.0.1:18081/items/7"
  [nginx-mtls]="https://127.0.0.1:18082/items/7"
  [sidecar]="https://127.0.0.1:18443/items/7"
  [nginx-edge-mtls]="https://127.0.0.2:18083/items/7"
  [gateway-sidecar]="https://127.0.0.2:18445/orders/42"
)
declare -A LABEL=(
  [nginx]="nginx → app (plain)"
  [nginx-mtls]="nginx mTLS (client cert verified) → app"
  [sidecar]="**castellan sidecar** (mTLS, authz, audit) → app"
  [nginx-edge-mtls]="nginx edge TLS → nginx mTLS hop → app"
  [gateway-sidecar]="**castellan gateway → sidecar** → app"
)
pids_of() {
  case "$1" in
    nginx|nginx-mtls) nginx_pids hop ;;
    nginx-edge-mtls) echo "$(nginx_pids edge) $(nginx_pids hop)" ;;
    sidecar) echo "$INV_PID" ;;
    gateway-sidecar) echo "$GW_PID $ORD_PID" ;;
  esac
}
ticks() { local s=0; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$s"; }
rss() { # total RSS, and the anonymous part (the rest are file pages: the binary, shared)
  local s=0 a=0
  for p in "$@"; do
    s=$((s + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
    a=$((a + $(awk '/RssAnon/ {print $2}' "/proc/$p/status")))
  done
  echo "$((s / 1024)) MB (anon $((a / 1024)) MB)"
}
HZ=$(getconf CLK_TCK)

echo "| path | max req/s | SUT CPU µs/req | @1,000 req/s p50 | p99 | p99.9 | non-2xx | SUT RSS at 1,000 req/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for name in ${ROWS:-nginx nginx-mtls sidecar nginx-edge-mtls gateway-sidecar}; do
  url="${URL[$name]}"
  args=(--no-tui --insecure --output-format json -c 32)
  case "$name" in
    gateway-sidecar) args+=(-H "Authorization: Bearer $KEY") ;;
    sidecar|nginx-mtls) args+=(--cert "$T/ord/svid.pem" --key "$T/ord/svid.key") ;;
  esac
  # shellcheck disable=SC2046
  set -- $(pids_of "$name")
  $GEN oha -z 2s "${args[@]}" "$url" >/dev/null # warm-up
  t0=$(ticks "$@")
  if [ -n "${PERF:-}" ]; then # PERF=prefix: a perf profile of the SUT during the max run
    perf record -q -F 999 ${PERF_ARGS:--g} -o "$PERF.$name" -p "$(echo "$@" | tr ' ' ',')" -- sleep "$SECS" 2>/dev/null &
    PERFPID=$!
  fi
  $GEN oha -z "${SECS}s" "${args[@]}" "$url" > "$T/max.json"
  t1=$(ticks "$@")
  if [ -n "${PERF:-}" ]; then wait "$PERFPID"; fi
  $GEN oha -q 1000 -z "${SECS}s" --latency-correction "${args[@]}" "$url" > "$T/fixed.json" &
  OHA=$!
  sleep "$(( SECS / 2 ))"
  mem=$(rss "$@")
  wait "$OHA"
  python3 - "$T/max.json" "$T/fixed.json" "$((t1 - t0))" "$HZ" "${LABEL[$name]}" "$mem" <<'PY'
import json, sys
mx, fx = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ticks, hz, label, mem = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
codes = mx.get("statusCodeDistribution", {})
done = sum(codes.values())
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
bad += sum(v for k, v in fx.get("statusCodeDistribution", {}).items() if not k.startswith("2"))
cpu = ticks / hz * 1e6 / max(done, 1)
lp = fx["latencyPercentiles"]
ms = lambda k: f"{lp[k] * 1000:.2f} ms"
print(f"| {label} | {mx['summary']['requestsPerSec']:,.0f} | {cpu:.1f} | {ms('p50')} | {ms('p99')} | {ms('p99.9')} | {bad} | {mem} |")
PY
done
