#!/usr/bin/env bash
# The test command: builds/refreshes .venv/ if needed, installs Debian's chromium if missing (root), then runs the
# whole suite offline on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/ensure_venv.sh
scripts/install_browser.sh  # Debian's chromium for the browser test; installing it needs root (CI runs as root)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest "${@:-tests}"
