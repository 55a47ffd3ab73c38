#!/usr/bin/env bash
# Decision-point benchmark, one run, same machine (issue 13):
#  1. nginx + auth_request → Castellan forward-auth  vs  nginx + auth_request → an nginx
#     location answering 204 for free; max throughput (wrk, 32 connections) and p99 at
#     1,000 req/s (oha), app = nginx returning a small JSON.
#  2. ext_authz Check over gRPC: a tonic client, 32 concurrent streams on one HTTP/2 connection
#     (crates/castellan-proxy/benches/ext_authz.rs), then p99 at 1,000 checks/s.
#  3. AuthZEN: one evaluation and a boxcar of 100 evaluations, one client, HTTPS (h2load --h1).
# The system under test (nginx and the decision point) is pinned to core 0, load generators to
# core 1. CPU per request: utime+stime of the pinned processes from /proc/PID/stat ÷ requests.
#
#   cargo build --release -p castellan && cargo build --release -p castellan-proxy --bench ext_authz
#   benches/decision.sh [SECONDS]
# Needs: nginx, wrk, h2load (nghttp2-client) from Debian; oha (cargo install oha).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
TD="${CARGO_TARGET_DIR:-/var/tmp/castellan-target}"
B="$TD/release/castellan"
LOADGEN="$(ls -t "$TD"/release/deps/ext_authz-* | grep -v '\.d$' | head -1)"
T="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -f "$T/nginx/nginx.pid" ] && kill "$(cat "$T/nginx/nginx.pid")" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

CASTELLAN_LOG=warn "$B" server init --trust-domain demo.castellan --data-dir "$T/cp" -o json > "$T/init.json"
CASTELLAN_LOG=warn taskset -c 1 "$B" server run --data-dir "$T/cp" --listen 127.0.0.1:0 2>"$T/cp.log" & PIDS+=($!)
for _ in $(seq 100); do [ -f "$T/cp/server.json" ] && break; sleep 0.1; done
export CASTELLAN_SERVER="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["url"])' "$T/cp/server.json")"
export CASTELLAN_TOKEN="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["admin_token"])' "$T/init.json")"
export CASTELLAN_CA_BUNDLE="$T/cp/bundle.pem"
J=$("$B" service add gateway --kind gateway --route /orders=orders --dns 127.0.0.2 -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["join_token"])')
"$B" service add orders -o json >/dev/null
"$B" policy apply examples/demo/policies >/dev/null
KEY=$("$B" apikey create --user alice --roles customer --claim customer_id=42 -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["api_key"])')
CLIENT=$("$B" client add pep --scopes authzen:evaluate -o json)
CID=$(echo "$CLIENT" | python3 -c 'import json,sys;print(json.load(sys.stdin)["client_id"])')
CSEC=$(echo "$CLIENT" | python3 -c 'import json,sys;print(json.load(sys.stdin)["client_secret"])')

CASTELLAN_LOG=warn taskset -c 0 "$B" proxy run --mode decision --id dp-1 --join-token "$J" --state-dir "$T/dp" \
  --route /orders=orders --listen 127.0.0.2:18645 --admin-listen 127.0.0.1:18646 \
  --ext-authz-listen 127.0.0.1:18691 --forward-auth-listen 127.0.0.1:18692 2>"$T/dp.log" & PIDS+=($!)
DP=${PIDS[-1]}
for _ in $(seq 200); do curl -sf http://127.0.0.1:18646/readyz >/dev/null && break; sleep 0.05; done

mkdir -p "$T/nginx/logs"
cat > "$T/nginx/nginx.conf" <<NGINX
worker_processes 1;
error_log $T/nginx/logs/error.log;
pid $T/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:18680; keepalive 64; }
  upstream castellan { server 127.0.0.1:18692; keepalive 64; }
  upstream free { server 127.0.0.1:18683; keepalive 64; }
  server { listen 127.0.0.1:18680; location / { default_type application/json; return 200 '{"ok":true}'; } }
  server { listen 127.0.0.1:18683; location / { return 204; } }
  server {
    listen 127.0.0.1:18681;
    location = /_auth { internal; proxy_pass http://castellan/forward-auth; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI \$request_uri; proxy_set_header X-Original-Method \$request_method; }
    location / { auth_request /_auth; auth_request_set \$u \$upstream_http_x_castellan_user;
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Castellan-User \$u; }
  }
  server {
    listen 127.0.0.1:18682;
    location = /_auth { internal; proxy_pass http://free/; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI \$request_uri; proxy_set_header X-Original-Method \$request_method; }
    location / { auth_request /_auth; auth_request_set \$u \$upstream_http_x_castellan_user;
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Castellan-User \$u; }
  }
}
NGINX
taskset -c 0 nginx -p "$T/nginx" -c nginx.conf
sleep 0.5
NGINX_MASTER=$(cat "$T/nginx/nginx.pid")
NGINX_PIDS="$NGINX_MASTER $(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" http://127.0.0.1:18681/orders/42)" = 200 ] || { echo "castellan path not answering 200"; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" http://127.0.0.1:18681/orders/7)" = 403 ] || { echo "castellan path did not deny"; exit 1; }

cpu_of() { local s=0; for p in "$@"; do s=$((s + $(ticks "$p"))); done; echo "$s"; }
echo "== forward-auth: nginx + auth_request (wrk -t1 -c32 ${SECS}s; nginx + decision point on core 0)"
printf "%-34s %10s %14s %16s %10s\n" "auth endpoint" "req/s" "SUT CPU µs/req" "of which DP µs" "p99@1k"
declare -A RPS
for row in free castellan; do
  port=$([ $row = free ] && echo 18682 || echo 18681)
  c0=$(cpu_of $NGINX_PIDS $DP); d0=$(ticks $DP)
  out=$(taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/orders/42")
  c1=$(cpu_of $NGINX_PIDS $DP); d1=$(ticks $DP)
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  RPS[$row]=$rps
  p99="-"
  if command -v oha >/dev/null; then
    p99=$(taskset -c 1 oha --no-tui --output-format json -z 5s -q 1000 -c 8 -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/orders/42" \
      | python3 -c 'import json,sys; print("%.2fms" % (json.load(sys.stdin)["latencyPercentiles"]["p99"] * 1000))')
  fi
  printf "%-34s %10s %14.1f %16.1f %10s\n" "$([ $row = free ] && echo 'nginx location: return 204' || echo 'castellan forward-auth')" "$rps" \
    "$(echo "($c1-$c0)*1000000/$HZ/$reqs" | bc -l)" "$(echo "($d1-$d0)*1000000/$HZ/$reqs" | bc -l)" "$p99"
done
echo "throughput ratio castellan/free: $(echo "${RPS[castellan]}/${RPS[free]}" | bc -l | cut -c1-5)"

echo; echo "== ext_authz Check over gRPC (tonic client, 32 streams, one HTTP/2 connection; decision point on core 0)"
d0=$(ticks $DP)
# PERF=FILE: also profile the decision point during this run (perf record -g), into FILE.
[ -n "${PERF:-}" ] && { perf record -F 499 -g -p "$DP" -o "$PERF" -- sleep "$SECS" >/dev/null 2>&1 & }
out=$(taskset -c 1 "$LOADGEN" 127.0.0.1:18691 32 "$SECS" 0 "Bearer $KEY")
d1=$(ticks $DP)
n=$(echo "$out" | sed -E 's/.*checks=([0-9]+).*/\1/')
echo "max:      $out  DP CPU µs/check=$(echo "($d1-$d0)*1000000/$HZ/$n" | bc -l | cut -c1-5)"
out=$(taskset -c 1 "$LOADGEN" 127.0.0.1:18691 32 5 1000 "Bearer $KEY")
echo "1,000/s:  $out"

echo; echo "== AuthZEN over HTTPS (h2load --h1, one client)"
TOKEN=$(curl -s --cacert "$CASTELLAN_CA_BUNDLE" -u "$CID:$CSEC" -d grant_type=client_credentials -d scope=authzen:evaluate "$CASTELLAN_SERVER/oauth2/token" | python3 -c 'import json,sys;print(json.load(sys.stdin)["access_token"])')
python3 - "$T" <<'PY'
import json, sys
t = sys.argv[1]
alice = {"type": "user", "id": "alice", "properties": {"roles": ["customer"], "claims": {"customer_id": "42"}}}
one = {"subject": alice, "action": {"name": "GET"}, "resource": {"type": "route", "id": "/orders/42"}}
json.dump(one, open(f"{t}/one.json", "w"))
box = {"subject": alice, "action": {"name": "GET"},
       "evaluations": [{"resource": {"type": "route", "id": f"/orders/{i}"}} for i in range(100)]}
json.dump(box, open(f"{t}/box.json", "w"))
PY
for what in one box; do
  path=$([ $what = one ] && echo evaluation || echo evaluations)
  d0=$(ticks $DP)
  out=$(taskset -c 1 h2load --h1 -c1 -D "$SECS" -d "$T/$what.json" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' "https://127.0.0.2:18645/access/v1/$path" 2>&1)
  d1=$(ticks $DP)
  n=$(echo "$out" | awk '/^requests:/ {print $8}')
  mean=$(echo "$out" | awk '/time for request:/ {print $6}')
  maxl=$(echo "$out" | awk '/time for request:/ {print $5}')
  echo "$([ $what = one ] && echo 'single evaluation   ' || echo 'boxcar of 100       ') requests=$n mean=$mean max=$maxl DP CPU µs/request=$(echo "($d1-$d0)*1000000/$HZ/$n" | bc -l | cut -c1-6)"
done
