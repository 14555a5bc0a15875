#!/usr/bin/env bash
# Installs Debian's chromium for the browser test (tests/test_gradio_app.py), which Playwright drives through its
# executable path: Playwright's own browser downloads are not used. Idempotent; installing needs root.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: /usr/bin/chromium is missing and installing it needs root: run 'sudo apt-get install chromium' " \
         "or this script as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
echo "chromium installed: $(/usr/bin/chromium --version)"
