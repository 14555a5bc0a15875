"""Runs every benchmark script in turn, each in its own process (so memory and threads start clean); each appends
its own row to benchmarks/RESULTS.md.

`python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--only NAME ...] [--variants]`. `--quick` runs tiny
sizes that prove the scripts work in seconds and records nothing; `--variants` adds bf16, SDPA-backend and
torch.compile runs of the model forward (compile at Stage C 1B only).
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def plan(device, quick, variants):
    """name -> argv of each run, in order."""
    d = ["--device", device]
    if quick:
        runs = {"model_forward": ["model_forward.py", "--models", "ctiny,btiny", "--pairs", "2", "--size", "256",
                                  "--gemm-seconds", "0.1", "--no-record"] + d,
                "pipeline": ["pipeline.py", "--preset", "tiny", "--size", "128", "--steps-c", "2", "--steps-b", "1",
                             "--no-record"] + d}
        if variants:  # bf16 is slow on CPU but these sizes are tiny; compile only on a GPU (minutes on CPU)
            runs["model_forward bf16 sdpa math"] = runs["model_forward"] + ["--dtype", "bf16", "--sdpa", "math"]
        if variants and device != "cpu":
            runs["model_forward compile"] = runs["model_forward"] + ["--compile"]
        return runs
    runs = {"model_forward": ["model_forward.py", "--models", "c1b,b700m"] + d,
            "model_forward big": ["model_forward.py", "--models", "c3.6b,b3b", "--pairs", "3"] + d,
            "pipeline": ["pipeline.py"] + d + (["--repeats", "2", "--warmup"] if device != "cpu" else []),
            "load_checkpoint": ["load_checkpoint.py", "--remove"],
            "train_throughput": ["train_throughput.py"] + d + (["--seconds", "5"] if device != "cpu" else [])}
    if variants:
        runs["model_forward bf16"] = ["model_forward.py", "--models", "c1b,b700m", "--dtype", "bf16"] + d
        runs["model_forward compile"] = ["model_forward.py", "--models", "c1b", "--compile"] + d
        if device != "cpu":
            runs["model_forward compile"] = ["model_forward.py", "--models", "c1b", "--dtype", "bf16", "--compile"] + d
            for backend in ("flash", "efficient", "cudnn", "math"):
                runs[f"model_forward sdpa {backend}"] = ["model_forward.py", "--models", "c1b,b700m", "--dtype",
                                                         "bf16", "--sdpa", backend] + d
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing recorded")
    parser.add_argument("--variants", action="store_true", help="bf16, SDPA backends, torch.compile")
    parser.add_argument("--only", nargs="*", help="names of runs to do (default: all)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each run")
    args = parser.parse_args(argv)
    failed = []
    for name, argv_ in plan(args.device, args.quick, args.variants).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}: {' '.join(argv_)}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run([sys.executable, os.path.join(HERE, argv_[0])] + argv_[1:],
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
