"""Samples/s and peak memory of a Stage C training step, at a small and a medium size, with and without
activation checkpointing (gradient_checkpointing).

Run by hand, not in CI: `python benchmarks/train_throughput.py [--steps 5] [--seconds 20] [--device cpu]
[--sizes small medium demo]`.
The step is the Stage C trainer's own (WurstCoreC.forward_pass: GDF noise, generator, weighted MSE; then backward,
clipping, AdamW) on synthetic latents and conditions, so that data loading and the frozen encoders do not blur the
generator's cost. Each configuration runs in a fresh process, so its peak memory is its own, and is timed for at
least `--steps` steps and `--seconds` seconds (median step time). Appends a row to benchmarks/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from modules.presets import preset_kwargs  # noqa: E402
from train import WurstCoreC  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
HEADER = "| date | benchmark | result | machine | CPU | torch |\n|---|---|---|---|---|---|\n"
# (preset, constructor overrides, latent side, batch); medium is ~56M parameters at 16×16 latents (a 680 px image)
SIZES = {
    "small": ("tiny", {}, 8, 8),
    "medium": ("tiny", dict(c_cond=512, c_hidden=[512, 512], nhead=[8, 8], blocks=[[2, 6], [6, 2]]), 16, 4),
    "demo": ("demo", {}, 16, 64),  # the demo cascade's Stage C as configs/training/demo_c.yaml trains it
}


class SyntheticStageC(WurstCoreC):
    """The Stage C trainer with latents and conditions taken from the batch instead of the frozen encoders."""

    def get_conditions(self, batch, models, extras, **kwargs):
        return batch["conditions"]

    def encode_latents(self, batch, models, extras):
        return batch["latents"]


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(size, checkpointing, steps, seconds, device):
    """One configuration in this process: {'samples_per_s', 'peak_mb', 'step_mb', 'params_m'}."""
    preset, overrides, side, batch_size = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        config = {"experiment_id": "bench", "checkpoint_path": tmp, "output_path": tmp, "lr": 1e-4,
                  "batch_size": batch_size, "grad_accum_steps": 1, "updates": steps, "warmup_updates": 0,
                  "save_every": steps, "backup_every": steps, "webdataset_path": "unused.tar", "image_size": 64,
                  "model_version": preset, "model_kwargs": overrides, "gradient_checkpointing": checkpointing,
                  "effnet_checkpoint_path": None, "previewer_checkpoint_path": None}
        core = SyntheticStageC(config_dict=config, device=device)
    torch.manual_seed(0)
    extras = core.setup_extras_pre()
    generator, _ = core.setup_generator("stage_c")
    models = core.Models(generator=generator)
    optimizer = core.setup_optimizers(extras, models).generator
    kwargs = {**preset_kwargs("stage_c", preset), **overrides}
    batch = {"captions": [""] * batch_size,
             "latents": torch.randn(batch_size, 16, side, side, device=core.device),
             "conditions": {"clip_text": torch.randn(batch_size, 77, kwargs["c_clip_text"], device=core.device),
                            "clip_text_pooled": torch.randn(batch_size, 1, kwargs["c_clip_text_pooled"],
                                                            device=core.device),
                            "clip_img": torch.zeros(batch_size, 1, kwargs["c_clip_img"], device=core.device)}}
    before = rss_mb()
    if core.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(core.device)
    times = []
    while len(times) <= steps or sum(times[1:]) < seconds:  # the first step warms up and is not timed
        start = time.perf_counter()
        with core.autocast():
            _, loss = core.forward_pass(batch, extras, models)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), core.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)
        times.append(time.perf_counter() - start)
        core.info.iter += 1
    if core.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(core.device) / 2**20
        step_mb = peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
        step_mb = peak - before
    return {"samples_per_s": batch_size / statistics.median(times[1:]), "steps": len(times) - 1, "peak_mb": peak,
            "step_mb": step_mb,
            "params_m": sum(p.numel() for p in generator.parameters()) / 1e6}


def cpu_model():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps, at least")
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per configuration, at least")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "medium"],
                        help="what to measure (demo: on request)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: measure one configuration, print it as JSON
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.steps, args.seconds, args.device)))
        return
    parts = []
    # the child imports this project from ROOT, and whatever else from where the parent found it (a GPU machine's
    # carried wheels sit on PYTHONPATH)
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    for size in args.sizes:
        for checkpointing in (False, True):
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--seconds",
                                   str(args.seconds), "--device", args.device, "--one", size, str(int(checkpointing))],
                                  capture_output=True, text=True, env=child_env)
            if done.returncode:
                sys.exit(f"{size}, checkpointing {checkpointing}: the step failed:\n{done.stderr[-4000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            _, _, side, batch_size = SIZES[size]
            label = f"{size} ({r['params_m']:.1f}M, {side}×{side} latents, batch {batch_size})"
            label += ", checkpointing" if checkpointing else ""
            memory = "GPU memory" if args.device != "cpu" else "RSS"
            parts.append(f"{label}: {r['samples_per_s']:.2f} samples/s (median of {r['steps']} steps), peak {memory} "
                         f"{r['peak_mb']:.0f} MB (+{r['step_mb']:.0f} MB in the steps)")
            print(parts[-1], flush=True)
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 2**20
    machine = (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, "
               f"load average {os.getloadavg()[0]:.1f}, device {args.device})")
    result = "Stage C training step: " + "; ".join(parts)
    if not os.path.exists(RESULTS):
        with open(RESULTS, "w") as f:
            f.write("# Benchmark results\n\nOne row per run; each benchmark script appends its own.\n\n" + HEADER)
    with open(RESULTS, "a") as f:
        f.write(f"| {datetime.date.today()} | train_throughput | {result} | {machine} | {cpu_model()} | "
                f"{torch.__version__} |\n")


if __name__ == "__main__":
    main()
