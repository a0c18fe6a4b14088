#!/usr/bin/env bash
# Builds the browser call page (web/) into server/static/call/, which `talkingmachines serve` serves at /call.
#   deploy/build_web.sh
# Needs Node.js >= 20 and npm with access to the npm registry (first run). Installs the exact versions of
# web/package-lock.json (`npm ci`) and bundles livekit-client with esbuild. Idempotent: re-running rebuilds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "build_web: $*"; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "Node.js >= 20 and npm are needed to build the call page (https://nodejs.org/en/download);" >&2
  say "without them the server runs, but GET /call answers 503 'call page not built'." >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  say "Node.js $(node --version) is too old; the call page build needs Node.js >= 20" >&2
  exit 1
fi

cd "$ROOT/web"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
say "built $ROOT/server/static/call (served at /call)"
