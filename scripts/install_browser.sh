#!/usr/bin/env bash
# Install the headless browser the website test drives: Debian's chromium and chromium-driver
# (a test tool's own browser download needs the open internet). Skipped when both are present.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "[browser] $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | cut -d' ' -f1-2)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "[browser] installing chromium and chromium-driver with apt-get (log: _build/apt.log)"
mkdir -p "$(dirname "$0")/../_build"
log="$(dirname "$0")/../_build/apt.log"
if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >"$log" 2>&1; then
  tail -30 "$log"
  echo "[browser] apt-get install failed" >&2
  exit 1
fi
echo "[browser] $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | cut -d' ' -f1-2)"
