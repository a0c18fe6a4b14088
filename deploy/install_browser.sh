#!/usr/bin/env bash
# Installs Chromium and its WebDriver (Debian packages `chromium`, `chromium-driver`) for the end-to-end
# browser test (tests/browser/). Idempotent: nothing to do when /usr/bin/chromium and /usr/bin/chromedriver
# exist. Needs root (apt-get); otherwise it says what to run.
set -euo pipefail
say() { echo "install_browser: $*"; }

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  say "$(/usr/bin/chromium --version 2>/dev/null || echo chromium) and chromedriver are installed; nothing to do"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "no apt-get: install Chromium and its matching chromedriver at /usr/bin/chromium and" >&2
  say "/usr/bin/chromedriver with this system's package manager (the browser test needs both)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  say "installing Chromium needs root: run 'sudo apt-get update && sudo apt-get install -y chromium" >&2
  say "chromium-driver' (or run this script as root)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver
say "installed $(/usr/bin/chromium --version)"
