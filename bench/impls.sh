# shellcheck shell=bash
# consul-proxy's plug-in for the shared benchmark harness (../shared/bench): adds
#   consul_proxy   - two consul-proxy processes (this repository's release build), default
#                    settings (one thread)
#   consul_proxy_t2 - the same with -threads 2
#   consul_builtin - two `consul connect proxy` processes, Consul's own proxy
#   splice_relay   - two zero-copy plain TCP relays (bench/splice-relay.c): the machine's
#                    ceiling for any relay pair, not a competitor
# both configured by one loopback-only `consul agent -dev` started on first use and tracked
# as the harness's "backend" role (stopped by PID at the end of the run).
#
# Names use "_" because the harness reads IMPL_TLS_<name> and friends as shell variables.
#
# Certificates: the agent's Connect CA is configured with the harness's own CA key and root
# (ca_config private_key/root_cert) and the harness's trust domain as cluster_id, so the leaves
# the agent issues chain to certs/ca.pem and carry the same SPIFFE IDs as certs/web.pem and
# certs/db.pem. The harness's mTLS checks therefore run unchanged against both proxies.
#
# Usage (from this repository):
#   cargo build --release
#   BENCH_IMPL_FILES=$PWD/bench/impls.sh BENCH_OUT=$PWD/bench/out \
#     IMPLS="direct socat stunnel haproxy consul_builtin consul_proxy" ../shared/bench/run.sh

_CP_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONSUL_PROXY_BIN=${CONSUL_PROXY_BIN:-$_CP_REPO/target/release/consul-proxy}
CONSUL_BIN=${CONSUL_BIN:-$(bash "$_CP_REPO/scripts/install-consul.sh" 2>/dev/null)}
# The agent's ports sit inside the harness's range but away from its per-implementation ports;
# consul-proxy's admin endpoints (metrics during a run) are at +6 (server side) and +7 (client).
_CP_HTTP_PORT=$((${PORT_BASE:-20000} + 990))
_CP_AGENT="127.0.0.1:$_CP_HTTP_PORT"

IMPLS_KNOWN+=" consul_builtin consul_proxy"
IMPL_DESC_consul_proxy="consul-proxy $("$CONSUL_PROXY_BIN" -version 2>/dev/null | awk '{print $2}') (tokio, rustls), 1 process per side, config and certs from a consul agent"
IMPL_TLS_consul_proxy=1
# BENCH_TLS_RESUME=0 -> -tls-resumption off (consul-proxy resumes only with consul-proxy peers).
IMPL_RESUME_KNOB_consul_proxy=1
IMPLS_KNOWN+=" consul_proxy_t2"
IMPL_DESC_consul_proxy_t2="consul-proxy as consul_proxy, with -threads 2 (connections on 2 worker threads)"
IMPL_TLS_consul_proxy_t2=1
IMPL_RESUME_KNOB_consul_proxy_t2=1
IMPL_DESC_consul_builtin="consul connect proxy $("$CONSUL_BIN" version 2>/dev/null | awk 'NR==1{print $2}') (Go), 1 process per side, agent API mode"
IMPL_TLS_consul_builtin=1
IMPL_RESUME_KNOB_consul_builtin=0

_cp_api() { # METHOD PATH [JSON]
    if [[ -n ${3:-} ]]; then
        curl -sf -X "$1" --data "$3" "http://$_CP_AGENT$2" >/dev/null
    else
        curl -sf -X "$1" "http://$_CP_AGENT$2"
    fi
}

# Starts the agent once per run; its CA is the harness CA. CA_PEM comes from the start args.
_cp_agent_ensure() { # CA_PEM
    # (Outputs are captured before matching: under pipefail, grep -q closing a pipe early can
    # turn a match into a failure.)
    [[ $(_cp_api GET /v1/status/leader 2>/dev/null) == *127.0.0.1* ]] && return 0
    local ca=$1 wd="${RUN_DIR:-${TMPDIR:-/tmp}}/consul-agent" key="${1%.pem}.key" td
    td=$(openssl x509 -in "$ca" -noout -ext subjectAltName 2>/dev/null | grep -o 'spiffe://[^,]*' | head -1)
    td=${td#spiffe://}
    mkdir -p "$wd"
    cat >"$wd/agent.hcl" <<EOF
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
data_dir = "$wd/data"
log_level = "warn"
ports {
  http = $_CP_HTTP_PORT
  dns = -1
  grpc = -1
  grpc_tls = -1
  serf_lan = $((_CP_HTTP_PORT + 1))
  serf_wan = $((_CP_HTTP_PORT + 2))
  server = $((_CP_HTTP_PORT + 3))
}
connect {
  enabled = true
  ca_provider = "consul"
  ca_config {
    cluster_id = "${td%.consul}"
    private_key = <<KEY
$(cat "$key")
KEY
    root_cert = <<CERT
$(cat "$ca")
CERT
  }
}
EOF
    "$CONSUL_BIN" agent -dev -config-file "$wd/agent.hcl" >"$wd/consul.log" 2>&1 &
    bench_track backend $! consul-agent
    local i
    for ((i = 0; i < 200; i++)); do
        [[ $(_cp_api GET /v1/agent/connect/ca/roots 2>/dev/null) == *"$(sed -n 2p "$ca")"* ]] && break
        sleep 0.1
    done
    ((i < 200)) || { bench_log "consul agent did not come up with the harness CA (see $wd/consul.log)"; return 1; }
    _cp_api PUT "/v1/connect/intentions/exact?source=web&destination=db" '{"Action":"allow"}'
}

# db's sidecar: mTLS on LISTEN, forwarding to the backend on TARGET.
_cp_register_db() { # LISTEN TARGET
    _cp_api PUT /v1/agent/service/register "{\"ID\":\"db\",\"Name\":\"db\",\"Port\":$2,\"Address\":\"127.0.0.1\"}"
    _cp_api PUT /v1/agent/service/register "{\"Kind\":\"connect-proxy\",\"ID\":\"db-sidecar-proxy\",
        \"Name\":\"db-sidecar-proxy\",\"Address\":\"127.0.0.1\",\"Port\":$1,
        \"Proxy\":{\"DestinationServiceName\":\"db\",\"DestinationServiceID\":\"db\",
                  \"LocalServiceAddress\":\"127.0.0.1\",\"LocalServicePort\":$2}}"
}

# web's sidecar: upstream db on LISTEN. Consul requires a port on every connect-proxy, so web's
# sidecar gets an unused public port (nothing is sent to it). The harness's TARGET is where db's
# mTLS side listens (or its rogue server): make db's sidecar registration point there.
_cp_register_web() { # LISTEN TARGET
    local current
    current=$(_cp_api GET /v1/agent/service/db-sidecar-proxy 2>/dev/null | grep -o '"Port": *[0-9]*' | head -1 | grep -o '[0-9]*$')
    if [[ $current != "$2" ]]; then
        _cp_register_db "$2" 1
    fi
    _cp_api PUT /v1/agent/service/register '{"ID":"web","Name":"web","Port":1,"Address":"127.0.0.1"}'
    _cp_api PUT /v1/agent/service/register "{\"Kind\":\"connect-proxy\",\"ID\":\"web-sidecar-proxy\",
        \"Name\":\"web-sidecar-proxy\",\"Address\":\"127.0.0.1\",\"Port\":$((_CP_HTTP_PORT + 5)),
        \"Proxy\":{\"DestinationServiceName\":\"web\",\"DestinationServiceID\":\"web\",
                  \"Upstreams\":[{\"DestinationName\":\"db\",\"LocalBindAddress\":\"127.0.0.1\",\"LocalBindPort\":$1}]}}"
}

_cp_resumption() { if [[ ${BENCH_TLS_RESUME:-1} == 0 ]]; then echo off; else echo on; fi; }

# SIDE(server|client) THREADS LISTEN TARGET CA CERT KEY WORKDIR
_cp_start() {
    local side=$1 threads=$2 admin id
    shift 2
    if [[ $side == server ]]; then
        _cp_agent_ensure "$3" && _cp_register_db "$1" "$2" || return 1
        id=db-sidecar-proxy admin=$((_CP_HTTP_PORT + 6))
    else
        _cp_agent_ensure "$3" && _cp_register_web "$1" "$2" || return 1
        id=web-sidecar-proxy admin=$((_CP_HTTP_PORT + 7))
    fi
    "$CONSUL_PROXY_BIN" -http-addr "$_CP_AGENT" -proxy-id "$id" -log-level warn -threads "$threads" \
        -tls-resumption "$(_cp_resumption)" -admin-addr "127.0.0.1:$admin" \
        >"$6/consul-proxy-$side.log" 2>&1 &
    bench_track "$side" $! "consul-proxy-$side"
}
impl_consul_proxy_server_start() { _cp_start server 1 "$@"; }
impl_consul_proxy_client_start() { _cp_start client 1 "$@"; }
impl_consul_proxy_t2_server_start() { _cp_start server 2 "$@"; }
impl_consul_proxy_t2_client_start() { _cp_start client 2 "$@"; }

# The built-in proxy opens its upstream listener before it has certificates; wait for its
# "ready" line so the first measured connections do not fail for that reason.
_cp_builtin_wait_ready() { # LOG
    local i
    for ((i = 0; i < 100; i++)); do
        grep -q "Proxy loaded config and ready to serve" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    bench_log "consul connect proxy not ready (see $1)"
    return 1
}
impl_consul_builtin_server_start() {
    _cp_agent_ensure "$3" && _cp_register_db "$1" "$2" || return 1
    "$CONSUL_BIN" connect proxy -http-addr "$_CP_AGENT" -proxy-id db-sidecar-proxy -log-level info >"$6/builtin-server.log" 2>&1 &
    bench_track server $! consul-builtin-server
    _cp_builtin_wait_ready "$6/builtin-server.log"
}
impl_consul_builtin_client_start() {
    _cp_agent_ensure "$3" && _cp_register_web "$1" "$2" || return 1
    "$CONSUL_BIN" connect proxy -http-addr "$_CP_AGENT" -proxy-id web-sidecar-proxy -log-level info >"$6/builtin-client.log" 2>&1 &
    bench_track client $! consul-builtin-client
    _cp_builtin_wait_ready "$6/builtin-client.log"
}

# --- splice_relay: the ceiling, not a competitor -------------------------------------------
# Two plain TCP relays (bench/splice-relay.c) that move bytes with splice(2) and never copy
# them into user space: no TLS, no copies, one thread per direction. What it moves in bulk is
# the most any pair of relays in this topology can move on this machine; BENCHMARKS.md reads
# the TLS proxies' bulk figures against it. Built on first use into the run's folder.
IMPLS_KNOWN+=" splice_relay"
IMPL_DESC_splice_relay="bench/splice-relay.c: plain TCP relay x2, splice(2) through a pipe, zero user-space copies, no TLS (a ceiling, not a proxy)"
IMPL_TLS_splice_relay=0
_cp_splice_relay_bin() { # WORKDIR -> prints the binary's path
    local bin="${BENCH_OUT:-${TMPDIR:-/tmp}}/splice-relay"
    if [[ ! -x $bin || $_CP_REPO/bench/splice-relay.c -nt $bin ]]; then
        cc -O2 -pthread -o "$bin" "$_CP_REPO/bench/splice-relay.c" || return 1
    fi
    echo "$bin"
}
impl_splice_relay_client_start() {
    local bin
    bin=$(_cp_splice_relay_bin) || return 1
    "$bin" "$1" "$2" >"$6/splice-relay-client.log" 2>&1 &
    bench_track client $! splice-relay-client
}
impl_splice_relay_server_start() {
    local bin
    bin=$(_cp_splice_relay_bin) || return 1
    "$bin" "$1" "$2" >"$6/splice-relay-server.log" 2>&1 &
    bench_track server $! splice-relay-server
}
