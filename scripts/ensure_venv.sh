#!/usr/bin/env bash
# Creates or refreshes .venv/ at the repo root from requirements.txt. Idempotent: a stamp holding the hash of
# requirements.txt (and the Python version) makes a second run install nothing and return in well under a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
want="$( (cat "$root/requirements.txt"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating/refreshing $venv from requirements.txt (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# (this machine's pip configuration names local indexes that may not exist: pip's warnings about them are noise)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements.txt" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "$want" > "$stamp"
echo "[setup] done" >&2
