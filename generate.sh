#!/usr/bin/env bash
# The main job: builds/refreshes .venv/ if needed, then generates images (arguments go to inference.generate;
# default: the embedded demo model, one 128² PNG in outputs/; the released weights once downloaded).
# `./generate.sh --help` lists every option.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/ensure_venv.sh
exec .venv/bin/python -m inference.generate "$@"
