"""Time and peak memory of loading a full-size 3.6B Stage C (bf16, ~7.2 GB) with core.weights.load_model.

Run by hand, not in CI: `python benchmarks/load_checkpoint.py [--path FILE] [--remove]`. The random checkpoint is
written once (reused if FILE exists) and loaded in fresh processes, first with its pages evicted from the page
cache (a read from disk), then again (cached), so the numbers show both the disk and the loader's own cost.
Appends a row to benchmarks/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from core.weights import load_model, save_model  # noqa: E402
from modules.presets import build_model  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
HEADER = "| date | benchmark | result | machine | CPU | torch |\n|---|---|---|---|---|---|\n"


def status(key):
    """A /proc/self/status field in bytes (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@torch.no_grad()
def write_random_checkpoint(path):
    """Random bf16 weights, one tensor at a time: the model never exists in fp32 (which would be 14.4 GB)."""
    model = build_model("stage_c", "3.6B", device="meta", dtype=torch.bfloat16).to_empty(device="cpu")
    for t in model.state_dict().values():
        t.normal_(0, 0.02)
    save_model(model, path)


def measure(path):
    """Runs in a fresh process: load time and peak RSS growth, as JSON on stdout."""
    before, start = status("VmRSS"), time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    weights = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"seconds": seconds, "peak_growth": status("VmHWM") - before, "weights": weights}))


def evict_from_page_cache(path):
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return next(names, platform.processor())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "stage_c_3.6b_random_bf16.safetensors"))
    parser.add_argument("--remove", action="store_true", help="delete the checkpoint afterwards")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh child process
    args = parser.parse_args()
    if args.measure:
        return measure(args.path)
    if not os.path.exists(args.path):
        start = time.perf_counter()
        write_random_checkpoint(args.path)
        print(f"wrote {args.path} in {time.perf_counter() - start:.0f} s")
    size = os.path.getsize(args.path)
    runs = {}
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict_from_page_cache(args.path)
        out = subprocess.run([sys.executable, __file__, "--measure", "--path", args.path], check=True,
                             capture_output=True, text=True).stdout
        runs[cache] = json.loads(out)
        print(cache, runs[cache])
    result = (f"3.6B Stage C bf16 file ({size / 1e9:.2f} GB) → load_model(dtype=bf16): "
              + ", ".join(f"{c} page cache {r['seconds']:.1f} s ({size / 1e9 / r['seconds']:.2f} GB/s), "
                          f"peak RSS +{r['peak_growth'] / 1e9:.2f} GB ({r['peak_growth'] / size:.2f}× file)"
                          for c, r in runs.items()))
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 2**20
    machine = (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, "
               f"load average {os.getloadavg()[0]:.1f})")
    row = f"| {datetime.date.today()} | load_checkpoint | {result} | {machine} | {cpu_model()} | {torch.__version__} |"
    if not os.path.exists(RESULTS):
        with open(RESULTS, "w") as f:
            f.write("# Benchmark results\n\nOne row per run; each benchmark script appends its own.\n\n" + HEADER)
    with open(RESULTS, "a") as f:
        f.write(row + "\n")
    print(row)
    if args.remove:
        os.remove(args.path)


if __name__ == "__main__":
    main()
