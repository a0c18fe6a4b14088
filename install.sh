#!/usr/bin/env bash
# Installs talkingmachines into ./.venv on a fresh machine (Python 3.11; PyPI, npm and, for --test, the Go
# module proxy and Debian packages).
#   ./install.sh            the package and its pinned runtime dependencies
#   ./install.sh --test     plus the test tools, the LiveKit server the integration tests run (built from
#                           its pinned Go module into .tools/bin; needs Go >= 1.26) and Chromium (Debian
#                           packages; needs root)
# Both build the browser call page (web/, Node.js >= 20) that `serve` shows at /call.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")"

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --test or --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
  echo "install.sh: Python 3.11 or 3.12 is required ($("$PY" --version 2>&1) found); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
extras=""
[ "$want_test" = 1 ] && extras="[test]"
# The PyPI torch is the CUDA build: ~6.5 GB in .venv plus ~3 GB of wheels pip downloads first. Warn up front,
# so that pip's "[Errno 28] No space left on device" half-way through does not come as a surprise.
need_gb=10
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  for dir in . "${TMPDIR:-/tmp}"; do
    free_gb=$(df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
    if [ "${free_gb:-0}" -lt "$need_gb" ]; then
      echo "install.sh: warning: ${free_gb} GB free on the disk holding $(cd "$dir" && pwd); a first install" \
        "needs about ${need_gb} GB (torch's CUDA build and its wheels). If pip runs out of space, free some" \
        "or set TMPDIR to a larger disk." >&2
    fi
  done
fi
echo "install.sh: installing talkingmachines${extras} and pinned dependencies into .venv (torch is large; a few minutes)"
.venv/bin/python -m pip install --quiet --progress-bar off -e ".${extras}"
if command -v npm >/dev/null 2>&1; then
  deploy/build_web.sh
else
  echo "install.sh: npm not found: skipping the call page (serve answers 503 at /call until deploy/build_web.sh runs)"
fi
if [ "$want_test" = 1 ]; then
  deploy/install_livekit_server.sh
  deploy/install_browser.sh
fi
echo "install.sh: done — $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
