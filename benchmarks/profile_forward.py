"""Where a Stage B/C forward spends its time, ours next to diffusers': torch.profiler's per-operator self CPU time
for one forward of each (same random weights, inference mode), the top operators side by side.

Run by hand: `python benchmarks/profile_forward.py [--model c1b|b700m|ctiny|btiny] [--size 1024] [--top 20]`.
Use it to find what makes one implementation slower before changing code; model_forward.py is the timing.
"""
import argparse
from collections import defaultdict

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from torch.profiler import ProfilerActivity, profile

from common import diffusers_twin, random_model
from model_forward import MODELS, call_diffusers, inputs


def op_times(fn, repeats=1):
    """{operator: (self CPU seconds, calls)} of `repeats` calls after one untimed warm-up call."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    out = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        out[event.key][0] += event.self_cpu_time_total / 1e6 / repeats
        out[event.key][1] += event.count // repeats
    return dict(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="c1b", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    kind, preset, _ = MODELS[args.model]
    ours = random_model(kind, preset)
    x = inputs(kind, ours, args.batch, args.size, torch.device("cpu"), torch.float32)
    twin = diffusers_twin(ours)
    with torch.inference_mode():
        times = {"ours": op_times(lambda: ours(**x), args.repeats),
                 "diffusers": op_times(lambda: call_diffusers(twin, kind, x), args.repeats)}
    total = {n: sum(t for t, _ in ops.values()) for n, ops in times.items()}
    names = sorted(set(times["ours"]) | set(times["diffusers"]),
                   key=lambda k: -max(times["ours"].get(k, (0, 0))[0], times["diffusers"].get(k, (0, 0))[0]))
    print(f"{kind} {preset}, {args.size}², batch {args.batch}, {torch.get_num_threads()} threads: self CPU time "
          f"ours {total['ours']:.2f} s, diffusers {total['diffusers']:.2f} s")
    print(f"{'operator':40s} {'ours s':>8s} {'calls':>6s} {'diffusers s':>12s} {'calls':>6s}")
    for name in names[:args.top]:
        (a, na), (b, nb) = times["ours"].get(name, (0, 0)), times["diffusers"].get(name, (0, 0))
        print(f"{name[:40]:40s} {a:8.3f} {na:6d} {b:12.3f} {nb:6d}")


if __name__ == "__main__":
    main()
