#!/usr/bin/env bash
# Real-browser test of `derm serve` (not part of .ci/run: it installs Chromium and takes a
# minute or two). Installs Debian's `chromium` if it is missing (skips, with a message and exit
# status 0, when that is impossible), builds derm, trains a tiny phantom run, and drives headless
# Chromium through the DevTools protocol (scripts/serve_browser_test.py, Python standard
# library only).
#
#   scripts/serve_browser_test.sh [--screenshot docs/img/serve_screenshot.png] [--run-screenshot PNG]
#
# Exit status: 0 passed (or skipped: the output says SKIP), 1 failed.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
    echo "SKIP: $*"
    echo "SKIP: the browser test of derm serve did not run."
    exit 0
}

find_chromium() {
    command -v chromium || command -v chromium-browser || command -v google-chrome || true
}

CHROMIUM="${CHROMIUM:-$(find_chromium)}"
if [ -z "$CHROMIUM" ]; then
    echo "chromium not found: installing Debian's chromium package"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
            skip "chromium is not installed and installing it needs root (run: apt-get install chromium)"
        fi
    fi
    command -v apt-get >/dev/null || skip "chromium is not installed and this system has no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium; }; then
        skip "apt-get could not install chromium (no network or no package)"
    fi
    CHROMIUM="$(find_chromium)"
    [ -n "$CHROMIUM" ] || skip "chromium was installed but no chromium binary is on the PATH"
fi
command -v python3 >/dev/null || skip "python3 is needed to drive the browser"

echo "building derm (cargo build -p derm-cli)"
cargo build -q -p derm-cli
SHOT="target/serve-browser/serve_screenshot.png"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --screenshot) SHOT="$2"; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
exec timeout 600 python3 scripts/serve_browser_test.py --derm target/debug/derm --chromium "$CHROMIUM" \
    --screenshot "$SHOT" "${ARGS[@]}"
