#!/usr/bin/env bash
# Installs the pinned LiveKit SFU (Go module github.com/livekit/livekit-server) into a project-local directory,
# for the LiveKit integration tests (tests/livekit/) and local development.
#   deploy/install_livekit_server.sh            installs <repo>/.tools/bin/livekit-server
#   TM_TOOLS_BIN=/some/dir deploy/install_livekit_server.sh   installs /some/dir/livekit-server
# Idempotent: an existing binary that reports the pinned version is kept. Uses the ordinary Go caches
# (GOMODCACHE, GOCACHE, GOPATH, GOPROXY as configured), so a second machine-local run is fast.
# Needs Go >= 1.26 (the module's go.mod declares `go 1.26`) and access to the Go module proxy.
set -euo pipefail

VERSION=v1.13.5 # tag v1.13.5 (3b9f1183); its go.mod has no replace directives, so `go install pkg@version` works
MODULE=github.com/livekit/livekit-server
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST_DIR=${TM_TOOLS_BIN:-$ROOT/.tools/bin}
DEST=$DEST_DIR/livekit-server

say() { echo "install_livekit_server: $*"; }

if [ -x "$DEST" ] && "$DEST" --version 2>/dev/null | grep -q "${VERSION#v}"; then
  say "$DEST is already $VERSION; nothing to do"
  exit 0
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  PATH=/usr/local/go/bin:$PATH # the official tarball's location, often not on a non-login PATH
fi
if ! command -v go >/dev/null 2>&1; then
  say "Go is not on PATH. livekit-server $VERSION is built from source and needs Go >= 1.26:" >&2
  say "install it from https://go.dev/dl/ (e.g. /usr/local/go/bin) and add it to PATH, then re-run." >&2
  exit 1
fi

go_version=$(go env GOVERSION) # e.g. go1.26.8
read -r major minor <<<"$(echo "${go_version#go}" | awk -F. '{print $1, $2}')"
if [ "$major" -lt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -lt 26 ]; }; then
  if [ "$(go env GOTOOLCHAIN)" = "local" ]; then
    say "$go_version is too old: $MODULE $VERSION needs Go >= 1.26 and GOTOOLCHAIN=local forbids" >&2
    say "downloading a newer toolchain. Install Go >= 1.26 from https://go.dev/dl/ or unset GOTOOLCHAIN." >&2
    exit 1
  fi
  say "$go_version is older than 1.26; the go command will fetch the toolchain the module asks for"
fi

mkdir -p "$DEST_DIR"
# Build into a scratch GOBIN and move into place only on success, so an interrupted build never leaves a
# half-written binary behind that a later run would take for a good one.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
say "building $MODULE/cmd/server@$VERSION with $go_version (first build downloads ~150 modules; minutes)"
GOBIN="$scratch" go install "$MODULE/cmd/server@$VERSION"
mv -f "$scratch/server" "$DEST"
say "installed $("$DEST" --version 2>/dev/null | head -n1) at $DEST"
