"""One Stage B/C forward (batch 2 = one CFG pair) at full size: this project against diffusers' StableCascadeUNet
holding the same (converted) random weights, with FLOP/s against a reference GEMM of the model's largest matmul.

Run by hand, not in CI: `python benchmarks/model_forward.py [--models c1b,b700m] [--pairs 5] [--device cpu]
[--dtype fp32|bf16] [--compile] [--sdpa default|math|flash|efficient|cudnn] [--size 1024]`. Pairs (c1b, b700m) are
timed interleaved, ours and diffusers' alternating which goes first; the big models (c3.6b, b3b) are timed one
implementation at a time (the twin shares our weights' storage and ours is freed first). Both sides run under
torch.inference_mode with their default attention unless --sdpa pins a backend for both. FLOPs are counted by
torch.utils.flop_counter in the untimed warm-up forward, which also records the largest matmul; a GEMM of that
shape is timed in the same run. Prints a table and appends a row to benchmarks/RESULTS.md.
"""
import argparse
import contextlib
import gc
import statistics
import time

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from common import append_result, diffusers_twin, interleaved, print_table, random_model, spread, timed

MODELS = {"c1b": ("stage_c", "1B", True), "b700m": ("stage_b", "700M", True),
          "c3.6b": ("stage_c", "3.6B", False), "b3b": ("stage_b", "3B", False),
          "ctiny": ("stage_c", "tiny", True), "btiny": ("stage_b", "tiny", True)}  # kind, preset, side by side
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}


class LargestMatmul(TorchDispatchMode):
    """Records the (batch, M, K, N) of the matmul with the most FLOPs seen while active."""

    def __init__(self):
        super().__init__()
        self.shape, self.flops = None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        shape = None
        if name == "linear":  # inference mode dispatches nn.Linear undecomposed: (..., K) @ (N, K)ᵀ
            a, w = args[0], args[1]
            shape = (1, a.numel() // a.shape[-1], a.shape[-1], w.shape[0])
        elif name in MATMULS:
            a, b = (args[1], args[2]) if name.startswith(("add", "badd")) else (args[0], args[1])
            shape = (a.shape[0] if a.dim() == 3 else 1, a.shape[-2], a.shape[-1], b.shape[-1])
        if shape is not None:
            flops = 2 * shape[0] * shape[1] * shape[2] * shape[3]
            if flops > self.flops:
                self.shape, self.flops = shape, flops
        return func(*args, **(kwargs or {}))


def inputs(kind, model, batch, size, device, dtype):
    """Inputs of one forward at `size` pixels (Stage C 16×ceil(size/42.67)², Stage B 4×(size/4)²)."""
    g = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    side_c = -(-size * 3 // 128)  # ceil(size / 42.67)
    r = torch.rand(batch, generator=g, device=device)
    if kind == "stage_c":
        return dict(x=rand(batch, 16, side_c, side_c), r=r,
                    clip_text=rand(batch, 77, model.clip_txt_mapper.in_features),
                    clip_text_pooled=rand(batch, 1, model.clip_txt_pooled_mapper.in_features),
                    clip_img=rand(batch, 1, model.clip_img_mapper.in_features))
    return dict(x=rand(batch, 4, size // 4, size // 4), r=r, effnet=rand(batch, 16, side_c, side_c),
                clip=rand(batch, 1, model.clip_mapper.in_features))


def call_diffusers(twin, kind, x):
    """diffusers' argument order: (sample, timestep_ratio, clip_text_pooled, ...). Its timestep embedding keeps the
    ratio's dtype, so the ratio is given in the model's dtype, as diffusers' own pipelines do."""
    x = dict(x)
    x["r"] = x["r"].to(x["x"].dtype)
    if kind == "stage_c":
        return twin(x.pop("x"), x.pop("r"), x.pop("clip_text_pooled"), clip_text=x.pop("clip_text"),
                    clip_img=x.pop("clip_img")).sample
    return twin(x.pop("x"), x.pop("r"), x.pop("clip"), effnet=x.pop("effnet")).sample


def sdpa_context(backend):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "cudnn":
                        SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend])


def gemm_flops_per_s(shape, device, dtype, seconds=1.0):
    """FLOP/s of torch.(b)mm at (batch, M, K, N): median of 5 timings, each of enough calls to last ~seconds/5."""
    batch, m, k, n = shape
    a = torch.randn(batch, m, k, device=device, dtype=dtype)
    b = torch.randn(batch, k, n, device=device, dtype=dtype)
    op = (lambda: torch.bmm(a, b)) if batch > 1 else (lambda: torch.mm(a[0], b[0]))
    one = timed(op, device)
    reps = max(1, int(seconds / 5 / max(one, 1e-6)))
    times = [timed(lambda: [op() for _ in range(reps)], device) / reps for _ in range(5)]
    return 2 * batch * m * k * n / statistics.median(times)


def warm_up(fn):
    """One untimed forward, counting FLOPs and the largest matmul; returns (flops, matmul shape)."""
    largest, counter = LargestMatmul(), FlopCounterMode(display=False)
    with counter, largest:
        fn()
    return counter.get_total_flops(), largest.shape


def measure(name, args):
    """Times one model's forward for both implementations; returns table rows and a summary string."""
    kind, preset, side_by_side = MODELS[name]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours = random_model(kind, preset, device=device).to(dtype)
    params = sum(p.numel() for p in ours.parameters())
    x = inputs(kind, ours, args.batch, args.size, device, dtype)
    twin = diffusers_twin(ours, share=not side_by_side)
    twin = twin.to(dtype) if dtype != torch.float32 else twin  # .to() warns even as a no-op
    eager = {"ours": lambda m=ours: m(**x), "diffusers": lambda m=twin: call_diffusers(m, kind, x)}
    fns = dict(eager)
    if args.compile:
        compiled = {"ours": torch.compile(ours), "diffusers": torch.compile(twin)}
        fns = {"ours": lambda: compiled["ours"](**x),
               "diffusers": lambda: call_diffusers(compiled["diffusers"], kind, x)}
    del twin
    results, warm, times = {}, {}, {}

    def prepare(n):  # FLOPs counted on the eager module; a compiled one is then called once untimed (compilation)
        warm[n] = warm_up(eager[n])
        if args.compile:
            fns[n]()

    with torch.inference_mode(), sdpa_context(args.sdpa):
        if side_by_side:
            for n in fns:
                prepare(n)
            times = interleaved(fns, args.pairs, device)
        else:  # one at a time: ours, then free it (the twin keeps the shared weights alive), then diffusers
            for n in ("ours", "diffusers"):
                prepare(n)
                times[n] = [timed(fns[n], device) for _ in range(args.pairs)]
                if n == "ours":
                    eager["ours"] = fns["ours"] = None
                    if args.compile:
                        compiled["ours"] = None
                    del ours
                    gc.collect()
        gemm = gemm_flops_per_s(warm["ours"][1], device, dtype, args.gemm_seconds)
    rows = []
    for n in ("ours", "diffusers"):
        flops, shape = warm[n]
        achieved = flops / statistics.median(times[n])
        results[n] = achieved
        rows.append([f"{kind} {preset}", n, spread(times[n]), f"{flops / 1e12:.2f}", f"{achieved / 1e9:.1f}",
                     f"{achieved / gemm:.0%}", "×".join(map(str, shape))])
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    ratio = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
    summary = (f"{kind} {preset} ({params / 1e6:.0f}M, {args.size}², batch {args.batch}, {args.dtype}"
               f"{', compiled' if args.compile else ''}{'' if args.sdpa == 'default' else ', sdpa ' + args.sdpa}): "
               f"ours {spread(times['ours'])}, diffusers {spread(times['diffusers'])}, "
               f"median ratio ours/diffusers {ratio:.2f}"
               + (f" (per pair {min(ratios):.2f}–{max(ratios):.2f})" if side_by_side else " (one at a time)")
               + f"; {warm['ours'][0] / 1e12:.2f} TFLOP, ours {results['ours'] / 1e9:.0f} GFLOP/s = "
               f"{results['ours'] / gemm:.0%} and diffusers {results['diffusers'] / gemm:.0%} of a "
               f"{'×'.join(map(str, warm['ours'][1]))} GEMM ({gemm / 1e9:.0f} GFLOP/s)")
    rows.append([f"{kind} {preset}", "reference GEMM", "", "", f"{gemm / 1e9:.1f}", "100%",
                 "×".join(map(str, warm["ours"][1]))])
    return rows, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="c1b,b700m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--pairs", type=int, default=5, help="timed forwards per implementation")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gemm-seconds", type=float, default=1.0, help="time spent timing the reference GEMM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both implementations")
    parser.add_argument("--sdpa", default="default", choices=["default", "math", "flash", "efficient", "cudnn"])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    headers = ["model", "implementation", "forward: median (min–max, n)", "TFLOP", "GFLOP/s", "of GEMM",
               "largest matmul (batch×M×K×N)"]
    rows, summaries = [], []
    for name in args.models.split(","):
        start = time.perf_counter()
        r, s = measure(name, args)
        rows += r
        summaries.append(s)
        print(s, f"[{time.perf_counter() - start:.0f} s]", flush=True)
        gc.collect()
    print_table(headers, rows)
    if not args.no_record:
        print(append_result("model_forward", "; ".join(summaries), args.device))


if __name__ == "__main__":
    main()
