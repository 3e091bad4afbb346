#!/usr/bin/env bash
# Installs headless Chromium and its matching chromedriver for the browser test of the chat UI
# (tests/test_chat_web_browser.py, driven by Selenium). dev/test.sh runs this before pytest.
# Debian (and Debian-based images) with apt; needs root or sudo. Does nothing when both are there.
#   bash dev/install_chromium.sh            # apt's output shown
#   bash dev/install_chromium.sh --quiet    # one line; apt's output goes to /tmp/mc_install_chromium.log
# Elsewhere: install Chromium (or Chrome) and its chromedriver yourself and point the test at them with
# MC_CHROMIUM=/path/to/browser MC_CHROMEDRIVER=/path/to/chromedriver.
# Exit status: 0 when both are installed afterwards, 1 when they could not be installed.
set -euo pipefail
quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
log=/tmp/mc_install_chromium.log

find_exe() {  # first of the arguments that is an executable on PATH (or a path), printed
    for exe in "$@"; do
        if [ -n "$exe" ] && command -v "$exe" >/dev/null 2>&1; then command -v "$exe"; return 0; fi
    done
    return 1
}
have_both() {
    find_exe "${MC_CHROMIUM:-}" chromium chromium-browser google-chrome >/dev/null &&
        find_exe "${MC_CHROMEDRIVER:-}" chromedriver >/dev/null
}

if have_both; then
    [ $quiet = 1 ] || echo "chromium and chromedriver are already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; install Chromium and chromedriver yourself and set" \
         "MC_CHROMIUM / MC_CHROMEDRIVER (or MC_ALLOW_NO_BROWSER=1 to skip the browser test)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "install_chromium: installing Chromium needs root (or password-less sudo)" \
             "(or set MC_ALLOW_NO_BROWSER=1 to skip the browser test)" >&2
        exit 1
    fi
fi
start=$(date +%s)
# Debian ships real `chromium` and `chromium-driver` packages built from one source, so the driver always
# matches the browser. (Ubuntu's `chromium-browser` is a snap wrapper that does not work in most containers:
# there, install Google Chrome and its chromedriver and set MC_CHROMIUM / MC_CHROMEDRIVER.)
run() {
    if [ $quiet = 1 ]; then "$@" >>"$log" 2>&1; else "$@"; fi
}
[ $quiet = 1 ] && : >"$log"
[ $quiet = 1 ] && echo "install_chromium: installing chromium + chromium-driver with apt (log: $log)"
if ! run $SUDO apt-get update -q ||
   ! run env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        chromium chromium-driver fonts-liberation; then
    echo "install_chromium: apt-get failed${log:+ (see $log)}" >&2
    exit 1
fi
if ! have_both; then
    echo "install_chromium: apt-get finished but chromium/chromedriver are still not on PATH" >&2
    exit 1
fi
echo "install_chromium: $(find_exe chromium chromium-browser google-chrome) and $(find_exe chromedriver)" \
     "installed in $(( $(date +%s) - start ))s"
