#!/usr/bin/env bash
# The benchmarks on a lent GPU machine, within 6 minutes; `--quick` runs tiny sizes in seconds (also on CPU, which
# is how the test suite checks this script).
#
#   bash benchmarks/gpu.sh [--quick]
#
# That machine has Python and torch but not diffusers, transformers or this project's other packages, and nothing
# over 64 MiB travels to it, so:
#   1. Here, once, in the repo root: `echo /.whl/ >> .git/info/exclude`, then download x86-64 cp312 wheels without
#      their dependencies, one version each, of what the benchmarks import beyond torch:
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#          -d .whl diffusers==0.42.1 transformers==5.24.0 safetensors huggingface_hub tokenizers regex \
#          open_clip_torch ftfy wcwidth pyyaml tqdm filelock requests ...
#      (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists what each one needs; the pure-Python
#      ones take --platform any.)
#   2. Run it with `.whl` carried; this script installs them into /tmp/site and puts that on PYTHONPATH.
# Full-size random weights are made on the machine (model_forward, pipeline). load_checkpoint (a 7 GB file written
# and read) is left to the CPU run. Results are appended to benchmarks/RESULTS.md, which is copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
PY=${PYTHON:-python3}
if [[ -d .whl ]] && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
export PYTHONUNBUFFERED=1
if [[ $QUICK == 1 ]]; then
  "$PY" benchmarks/run_all.py --device "$DEVICE" --quick --variants
  exit
fi
# The full run, most wanted first, each run cut off at its own limit and all of them within 6 minutes (a lease is
# 15 minutes, start included). RESULTS.md is copied to $OUT after every run, so a lease that ends
# mid-way still brings back what finished.
RUNS=("model_forward:75" "model_forward bf16:60" "model_forward big:75" "pipeline:120" "train_throughput:90"
      "model_forward sdpa flash:45" "model_forward sdpa math:45" "model_forward compile:150")
status=0
deadline=$((SECONDS + 360))
for entry in "${RUNS[@]}"; do
  name=${entry%:*} limit=${entry##*:} left=$((deadline - SECONDS))
  if ((left < 15)); then echo "== $name: skipped, the 6-minute budget is spent"; status=1; continue; fi
  ((limit > left)) && limit=$left
  "$PY" benchmarks/run_all.py --device "$DEVICE" --variants --timeout "$limit" --only "$name" || status=1
  if [[ -n "${OUT:-}" ]]; then cp benchmarks/RESULTS.md "$OUT/"; fi
done
exit $status
