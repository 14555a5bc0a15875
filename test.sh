#!/usr/bin/env bash
# The test command: builds/refreshes .venv/ if needed, then runs the whole suite offline on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/ensure_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest "${@:-tests}"
