"""Text-to-image end to end, per stage: this project's StableCascadePipeline against diffusers' prior + decoder
pipelines holding the same random Stage C/B weights and the same small random CLIP; peak RSS; the sampling loop's
own overhead (time between model calls) per step.

Run by hand, not in CI: `python benchmarks/pipeline.py [--preset lite|tiny] [--size 512] [--steps-c 20]
[--steps-b 10] [--repeats 1] [--device cpu] [--dtype fp32|bf16]`. `lite` is Stage C 1B + Stage B 700M + Stage A;
`tiny` the tiny presets. Each side runs in a fresh process (so peak RSS is its own), the sides alternating for
`--repeats` rounds; both build identical weights from the same seed. Both sample with upstream's defaults
(C: 20 steps, CFG 4; B: 10 steps, CFG 1.1; diffusers' decoder is given guidance 1.1 too, as its default 0 would
skip CFG). diffusers' Paella VQ decoder has random weights of Stage A's architecture (same cost, not the same
values). The loop overhead is also measured at the demo model's size (`--preset demo`: the shipped models/demo
cascade at 128², ours only) when it is there, else at the tiny preset at the same size. Prints a table and appends
a row to RESULTS.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import common
import torch

from common import append_result, diffusers_twin, peak_rss_mb, print_table, random_model

HERE = os.path.abspath(__file__)
PRESETS = {"lite": {"stage_c": "1B", "stage_b": "700M", "stage_a": "default", "clip": (1280, 1280, 20)},
           "tiny": {"stage_c": "tiny", "stage_b": "tiny", "stage_a": "tiny", "clip": (32, 24, 2)}}
STAGES = ("text", "C", "B", "A")
DEMO_CONFIG = os.path.join(common.ROOT, "configs", "inference", "demo.yaml")
DEMO_WEIGHTS = os.path.join(common.ROOT, "models", "demo", "stage_c.safetensors")


class Timeline:
    """Wraps model entry points to record (start, end) of every call per stage label."""

    def __init__(self, device):
        self.device, self.calls = device, {s: [] for s in STAGES}

    def wrap(self, obj, method, stage):
        inner = getattr(obj, method)

        def timed_call(*args, **kwargs):
            common.synchronize(self.device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            common.synchronize(self.device)
            self.calls[stage].append((start, time.perf_counter()))
            return out
        setattr(obj, method, timed_call)

    def summary(self):
        """Per stage: span (first call start → last call end), model time, calls; loop overhead = span − model."""
        out = {}
        for stage, calls in self.calls.items():
            if calls:
                model = sum(e - s for s, e in calls)
                out[stage] = {"span": calls[-1][1] - calls[0][0], "model": model, "calls": len(calls)}
        return out


def text_encoder(preset, device):
    from core.conditioning import random_text_encoder, tiny_text_config
    hidden, projection, heads = PRESETS[preset]["clip"]
    return random_text_encoder(tiny_text_config(hidden=hidden, projection=projection, layers=1, heads=heads)).to(device)


def build_demo(device, dtype):
    """(run, timeline) for this project's pipeline on the shipped demo cascade (its own MiniLM text encoder)."""
    from inference.loading import load_pipeline
    from inference.pipeline import STAGE_B_DEFAULTS, STAGE_C_DEFAULTS
    pipe = load_pipeline(DEMO_CONFIG, device=device, dtype=dtype)
    timeline = Timeline(device)
    for model, method, stage in ((pipe.text_model, "forward", "text"), (pipe.stage_c, "forward", "C"),
                                 (pipe.stage_b, "forward", "B"), (pipe.stage_a, "decode", "A")):
        timeline.wrap(model, method, stage)

    def run(prompt, size, steps_c, steps_b, seed):
        pipe.generate(prompt, height=size, width=size, seed=seed, stage_c=replace(STAGE_C_DEFAULTS, steps=steps_c),
                      stage_b=replace(STAGE_B_DEFAULTS, steps=steps_b))
    return run, timeline


def build(side, preset, device, dtype):
    """(run(prompt, size, steps_c, steps_b, seed), timeline) for one side, models built from fixed seeds."""
    from core.conditioning import build_tokenizer
    if preset == "demo":
        if side != "ours":
            raise ValueError("the demo preset runs this project's pipeline only")
        return build_demo(device, dtype)
    p = PRESETS[preset]
    stage_c = random_model("stage_c", p["stage_c"], device=device, seed=1)
    stage_b = random_model("stage_b", p["stage_b"], device=device, seed=2)
    tokenizer, clip = build_tokenizer(), text_encoder(preset, device)
    timeline = Timeline(device)
    timeline.wrap(clip, "forward", "text")
    if side == "ours":
        from inference.pipeline import STAGE_B_DEFAULTS, STAGE_C_DEFAULTS, StableCascadePipeline
        pipe = StableCascadePipeline(stage_c.to(dtype), stage_b.to(dtype),
                                     random_model("stage_a", p["stage_a"], device=device, seed=3).to(dtype),
                                     random_model("effnet", "tiny", device=device, seed=4), clip, tokenizer,
                                     device=device, dtype=dtype)
        timeline.wrap(stage_c, "forward", "C")
        timeline.wrap(stage_b, "forward", "B")
        timeline.wrap(pipe.stage_a, "decode", "A")

        def run(prompt, size, steps_c, steps_b, seed):
            pipe.generate(prompt, height=size, width=size, seed=seed, stage_c=replace(STAGE_C_DEFAULTS, steps=steps_c),
                          stage_b=replace(STAGE_B_DEFAULTS, steps=steps_b))
        return run, timeline
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    prior, decoder = diffusers_twin(stage_c, share=True), diffusers_twin(stage_b, share=True)
    del stage_c, stage_b
    vq_kwargs = {} if preset == "lite" else dict(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=64)
    torch.manual_seed(3)
    vqgan = PaellaVQModel(**vq_kwargs).to(device).eval()
    if dtype != torch.float32:
        prior, decoder, vqgan, clip = (m.to(dtype) for m in (prior, decoder, vqgan, clip))
    prior_pipe = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=clip, prior=prior,
                                            scheduler=DDPMWuerstchenScheduler())
    decoder_pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=clip,
                                                scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan)
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    timeline.wrap(prior, "forward", "C")
    timeline.wrap(decoder, "forward", "B")
    timeline.wrap(vqgan, "decode", "A")

    def run(prompt, size, steps_c, steps_b, seed):
        g = torch.Generator(device).manual_seed(seed)
        embeddings = prior_pipe(prompt, height=size, width=size, num_inference_steps=steps_c, guidance_scale=4.0,
                                generator=g).image_embeddings
        decoder_pipe(embeddings, prompt, num_inference_steps=steps_b, guidance_scale=1.1, generator=g,
                     output_type="pt")
    return run, timeline


def measure(side, args):
    """One side in this process: wall seconds, per-stage spans/model time, peak RSS (JSON on stdout)."""
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    run, timeline = build(side, args.preset, device, dtype)
    if args.warmup:
        run("a warm-up", args.size, 1, 1, 0)
        timeline.calls = {s: [] for s in STAGES}
    common.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        run("a red cube on a blue floor", args.size, args.steps_c, args.steps_b, 0)
    common.synchronize(device)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"wall": time.perf_counter() - start, "stages": timeline.summary(), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": gpu}


def child(side, args, preset=None):
    argv = [sys.executable, HERE, "--one", side, "--preset", preset or args.preset, "--size", str(args.size),
            "--steps-c", str(args.steps_c), "--steps-b", str(args.steps_b), "--device", args.device,
            "--dtype", args.dtype] + (["--warmup"] if args.warmup else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead(r):
    """Loop overhead per sampling step (C and B): span − model time, over the gaps between model calls; and the
    model time of one step."""
    per = {s: (r["stages"][s]["span"] - r["stages"][s]["model"]) / max(1, r["stages"][s]["calls"] - 1)
           for s in ("C", "B")}
    step = {s: r["stages"][s]["model"] / r["stages"][s]["calls"] for s in ("C", "B")}
    return per, step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, "demo"], default="lite")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps-c", type=int, default=20)
    parser.add_argument("--steps-b", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (ours, diffusers), alternating order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", action="store_true", help="one untimed 1+1-step image first")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--one", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    runs = {"ours": [], "diffusers": []} if args.preset != "demo" else {"ours": []}
    for i in range(args.repeats):
        for side in [s for s in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")) if s in runs]:
            runs[side].append(child(side, args))
            print(side, json.dumps(runs[side][-1]), flush=True)
    rows, parts = [], []
    for side, rs in runs.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        per, step = overhead(rs[0])
        rows.append([side, f"{med(lambda r: r['wall']):.2f}"]
                    + [f"{med(lambda r, s=s: r['stages'][s]['span']):.2f}" for s in STAGES]
                    + [f"{med(lambda r: r['peak_rss_mb']):.0f}",
                       f"C {per['C'] * 1e3:.1f} ({per['C'] / step['C']:.1%}), B {per['B'] * 1e3:.1f} "
                       f"({per['B'] / step['B']:.1%})"])
        parts.append(f"{side} {rows[-1][1]} s (text {rows[-1][2]}, C {rows[-1][3]}, B {rows[-1][4]}, A "
                     f"{rows[-1][5]} s), peak RSS {rows[-1][6]} MB, loop overhead per step ms (of a step) "
                     f"{rows[-1][7]}")
    wall = {side: statistics.median(r["wall"] for r in rs) for side, rs in runs.items()}
    ratio = wall["ours"] / wall["diffusers"] if "diffusers" in wall else float("nan")
    # the loop overhead at the demo model's size (its real weights, 128²) when shipped, else at the tiny preset at this
    # run's size (at 256² its Stage C works on 6×6 latents, where a step is mostly dispatch: 5-6% there)
    small, small_size = ("demo", 128) if os.path.exists(DEMO_WEIGHTS) else ("tiny", args.size)
    tiny = runs["ours"][0] if (args.preset, args.size) == (small, small_size) else child(
        "ours", argparse.Namespace(**{**vars(args), "preset": small, "size": small_size, "steps_c": 20,
                                      "steps_b": 10, "warmup": True}))
    per, step = overhead(tiny)
    lite_step = overhead(runs["ours"][0])[1]
    tiny_part = (f"loop overhead at the {small} preset: C {per['C'] * 1e3:.2f} ms/step = "
                 f"{per['C'] / lite_step['C']:.2%} of a {args.preset} C step ({per['C'] / step['C']:.1%} of a "
                 f"{small} one), B {per['B'] * 1e3:.2f} ms/step = {per['B'] / lite_step['B']:.2%} of a "
                 f"{args.preset} B step ({per['B'] / step['B']:.1%} of a {small} one)")
    print_table(["side", "end to end s", "text s", "Stage C s", "Stage B s", "Stage A s", "peak RSS MB",
                 "loop overhead ms/step (of a step)"], rows)
    summary = (f"text-to-image {args.preset} {args.size}², {args.steps_c}+{args.steps_b} steps, {args.dtype}, "
               f"{args.repeats} run(s) each: " + "; ".join(parts) + f"; ratio ours/diffusers {ratio:.2f}; "
               + tiny_part)
    print(summary)
    if not args.no_record:
        print(append_result("pipeline", summary, args.device))


if __name__ == "__main__":
    main()
