#!/usr/bin/env bash
# Installs headless Chromium for the browser test of the chat UI (tests/test_chat_web_browser.py).
# Debian / Ubuntu with apt; needs root or sudo. Does nothing when a Chromium is already installed.
#   bash dev/install_chromium.sh
# Elsewhere: install Chromium or Chrome yourself and point the test at it with MC_CHROMIUM=/path/to/binary.
set -euo pipefail
for exe in "${MC_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$exe" ] && command -v "$exe" >/dev/null 2>&1; then
        echo "chromium is already installed: $(command -v "$exe")"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no apt-get here; install Chromium with your package manager and set MC_CHROMIUM=/path/to/it" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "error: installing Chromium needs root (or sudo)" >&2
        exit 1
    fi
fi
$SUDO apt-get update
# Debian ships a real `chromium` package (Ubuntu's `chromium-browser` is a snap wrapper, which does not
# work in most containers: there, use a Debian image or install Google Chrome and set MC_CHROMIUM).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
command -v chromium
