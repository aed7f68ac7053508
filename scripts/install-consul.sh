#!/usr/bin/env bash
# Build the Consul binary the real-agent tests use, from the Go module proxy, and cache it.
#
# Only an MPL-2.0 release may be used: Consul from the 2023 licence change on is BUSL-1.1, and so
# are the envoyextensions and troubleshoot modules that releases from 1.15 on require. The 1.14
# line needs neither. This script refuses to build unless both checks pass:
#   1. the LICENSE inside the downloaded github.com/hashicorp/consul module is the MPL 2.0;
#   2. `go mod graph` of the wrapper module mentions neither envoyextensions nor troubleshoot.
#
# `go install github.com/hashicorp/consul@vX` is refused (Consul's go.mod has replace
# directives), so the build goes through a tiny wrapper module that requires Consul, repeats its
# non-local replace lines, and builds the root package.
#
# Usage: scripts/install-consul.sh            -> prints the path of the binary on stdout
# Env:   CONSUL_VERSION (default below), CONSUL_PROXY_CACHE (default ~/.cache/consul-proxy)
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-v1.14.11}"
CACHE="${CONSUL_PROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-proxy}"
DEST="$CACHE/consul-$CONSUL_VERSION"
BIN="$DEST/consul"

log() { printf 'install-consul: %s\n' "$*" >&2; }

# Capture the version first: `grep -q` closing the pipe early would SIGPIPE consul, and under
# pipefail that would look like a missing binary and trigger a rebuild.
if [ -x "$BIN" ] && [[ $("$BIN" version 2>/dev/null) == "Consul ${CONSUL_VERSION}"$'\n'* ]]; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { log "go is not on PATH; it is needed to build Consul"; exit 1; }

start=$(date +%s)
mkdir -p "$DEST"
work=$(mktemp -d "$DEST/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

export GOWORK=off GOFLAGS=-mod=mod GOTOOLCHAIN=local
go mod init consul-proxy.local/consul-wrapper >/dev/null 2>&1

log "downloading github.com/hashicorp/consul@$CONSUL_VERSION"
moddir=$(go mod download -json "github.com/hashicorp/consul@$CONSUL_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')

# Check 1: the licence of the exact module we are about to build.
if ! grep -q '^Mozilla Public License, version 2.0' "$moddir/LICENSE" ||
    grep -qi 'business source' "$moddir/LICENSE"; then
    log "refusing $CONSUL_VERSION: its LICENSE is not the Mozilla Public License 2.0"
    exit 1
fi

# Repeat Consul's non-local replace and exclude directives: they only apply in the main module.
# Local ones (=> ./api) are dropped on purpose, so the published api/sdk/proto-public are used.
python3 - "$moddir/go.mod" >>go.mod <<'PY'
import re, sys
text = open(sys.argv[1]).read()
out = []
for kind in ("replace", "exclude"):
    for block in re.findall(r'^%s \(\n(.*?)^\)' % kind, text, re.S | re.M):
        out += ["%s %s" % (kind, l.strip()) for l in block.splitlines() if l.strip() and not l.strip().startswith("//")]
    out += [l for l in re.findall(r'^%s [^(\n].*$' % kind, text, re.M)]
for line in out:
    if "=> ./" in line or "=> ../" in line:
        continue
    print(line)
PY

cat >tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/hashicorp/consul"
GO
go get "github.com/hashicorp/consul@$CONSUL_VERSION" >/dev/null 2>&1 || go get "github.com/hashicorp/consul@$CONSUL_VERSION"
go mod tidy >/dev/null 2>&1 || true

# Check 2: no BUSL-only module anywhere in the graph.
if go mod graph | grep -E 'hashicorp/consul/(envoyextensions|troubleshoot)' >&2; then
    log "refusing $CONSUL_VERSION: its module graph needs envoyextensions or troubleshoot (BUSL-1.1)"
    exit 1
fi

log "building (a cold build takes several minutes)"
# Go 1.26 builds v1.14.11 as is: no linkname override or module upgrade was needed.
go build -trimpath -o "$work/consul" github.com/hashicorp/consul
mv "$work/consul" "$BIN"
built=$("$BIN" version)
log "built ${built%%$'\n'*} in $(( $(date +%s) - start ))s"
echo "$BIN"
