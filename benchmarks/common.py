"""Shared helpers of the benchmark scripts: machine description, RESULTS.md rows, tables, interleaved timing,
random full-size models and their diffusers twins."""
import datetime
import inspect
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
HEADER = "| date | benchmark | result | machine | CPU | torch |\n|---|---|---|---|---|---|\n"
DIFFUSERS_BLOCKS = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}


# ---------------------------------------------------------------- machine and results
def cpu_model():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine(device):
    """Host, cores, RAM, load average now, device and torch threads: what a timing depends on."""
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 2**20
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"
    return (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, load average "
            f"{os.getloadavg()[0]:.1f}, device {name}, {torch.get_num_threads()} threads)")


def append_result(benchmark, result, device, path=RESULTS):
    """Appends one dated row to RESULTS.md (creating it with its header when missing); returns the row."""
    row = (f"| {datetime.date.today()} | {benchmark} | {result} | {machine(device)} | {cpu_model()} | "
           f"{torch.__version__} |")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# Benchmark results\n\nOne row per run; each benchmark script appends its own.\n\n" + HEADER)
    with open(path, "a") as f:
        f.write(row + "\n")
    return row


def print_table(headers, rows):
    """A markdown table on stdout."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |", flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def spread(times):
    """'median s (min–max, n)' of a list of seconds."""
    return f"{statistics.median(times):.3g} s ({min(times):.3g}–{max(times):.3g}, n={len(times)})"


# ---------------------------------------------------------------- timing
def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(fns, pairs, device):
    """Runs each of `fns` (name -> callable) once per round, alternating which goes first, for `pairs` rounds;
    returns name -> list of seconds. Alternation spreads slow drifts of a shared machine over both sides."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(pairs):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name], device))
    return times


# ---------------------------------------------------------------- random models
@torch.no_grad()
def random_model(kind, preset, device="cpu", seed=0, **overrides):
    """A preset built on meta, then materialised on `device` with small normal weights (never zeros: zero-init
    layers would make parts of the network trivial): std 1/sqrt(fan_in) for matrices, 0.02 for vectors."""
    from modules.presets import build_model
    model = build_model(kind, preset, device="meta", **overrides).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for t in model.state_dict().values():
        if t.is_floating_point():
            std = t[0].numel() ** -0.5 if t.dim() > 1 else 0.02
            t.normal_(0, std, generator=g)
    return model.eval().requires_grad_(False)


def diffusers_config(cls, kwargs):
    """diffusers' StableCascadeUNet config for our Stage B/C class built with `kwargs` (defaults filled in), written
    here because from_single_file would fetch it from the Hub. The parity tests use it too."""
    bound = inspect.signature(cls).bind(**kwargs)
    bound.apply_defaults()
    k = bound.arguments
    config = dict(
        in_channels=k["c_in"], out_channels=k["c_out"], timestep_ratio_embedding_dim=k["c_r"],
        patch_size=k["patch_size"], conditioning_dim=k["c_cond"], block_out_channels=k["c_hidden"],
        num_attention_heads=k["nhead"], down_num_layers_per_block=k["blocks"][0],
        up_num_layers_per_block=k["blocks"][1], down_blocks_repeat_mappers=k["block_repeat"][0],
        up_blocks_repeat_mappers=k["block_repeat"][1],
        block_types_per_layer=[[DIFFUSERS_BLOCKS[t] for t in level] for level in k["level_config"]],
        clip_seq=k["c_clip_seq"], kernel_size=k["kernel_size"], dropout=k["dropout"], self_attn=k["self_attn"],
        timestep_conditioning_type=k["t_conds"])
    if "c_clip_text" in k:  # Stage C
        config.update(clip_text_in_channels=k["c_clip_text"], clip_text_pooled_in_channels=k["c_clip_text_pooled"],
                      clip_image_in_channels=k["c_clip_img"], switch_level=k["switch_level"])
    else:
        config.update(clip_text_pooled_in_channels=k["c_clip"], effnet_in_channels=k["c_effnet"],
                      pixel_mapper_in_channels=k["c_pixels"], switch_level=None)
    return config


def _model_kwargs(model):
    """The constructor kwargs a model of modules.presets.build_model was built with."""
    from modules.presets import preset_kwargs
    spec = model.build_spec
    return {**preset_kwargs(spec["kind"], spec["preset"]), **spec["kwargs"]}


@torch.no_grad()
def diffusers_twin(model, share=False):
    """diffusers' StableCascadeUNet holding `model`'s weights, converted by diffusers' own single-file converter;
    built on meta and assigned. share=True reuses our tensors' storage (no second copy: for timing one
    implementation at a time, freeing ours first)."""
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
    with torch.device("meta"):
        twin = StableCascadeUNet(**diffusers_config(type(model), _model_kwargs(model)))
    sd = {k: v if share else v.clone() for k, v in model.state_dict().items()}
    twin.load_state_dict(convert_stable_cascade_unet_single_file_to_diffusers(sd), strict=True, assign=True)
    return twin.eval().requires_grad_(False)
