"""Build the embedded demo cascade from nothing: data, Stage A, the EfficientNet-Lite0 latent space (its mapper, with
the Previewer), the encoder caches, Stage B, Stage C, the Canny ControlNet and the '[zorb]' LoRA, then the evaluation
and the model card.

    python -m demo.build_model                 # every stage not done yet, in order
    python -m demo.build_model --from stage_c  # redo from a stage on (its exported file and later ones are replaced)

Each trainer is this project's own (`train/train_*.py` with `configs/training/demo_*.yaml`) and resumes from its
last checkpoint when interrupted; a stage counts as done once its file is exported to models/demo/, so a killed
build continues where it stopped. A stage redone with --from starts from nothing, and new data discards every cache
and checkpoint made from the old data. Exported weights are fp16 (the small encoder mapper stays fp32); work files go to
outputs/demo/. Wall times land in models/demo/build_log.json for the model card.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("models", "demo")
WORK = os.path.join("outputs", "demo")
DATA = os.path.join(WORK, "data")
CACHE_B = os.path.join(WORK, "cache_b")
CACHE_C = os.path.join(WORK, "cache_c")
LOG = os.path.join(OUT, "build_log.json")
NUM_TRAIN, NUM_HELDOUT, NUM_ZORB, IMAGE_SIZE = 12000, 300, 2000, 128


def _run(args):
    print("[demo] $", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def _config(name):
    return os.path.join("configs", "training", f"demo_{name}.yaml")


def _read_config(name):
    import yaml
    with open(os.path.join(REPO, _config(name))) as f:
        return yaml.safe_load(f)


def _run_folder(name, cfg=None):
    """Where the trainer of `configs/training/demo_<name>.yaml` keeps its checkpoints (and resumes from)."""
    cfg = cfg or _read_config(name)
    return os.path.join(REPO, cfg["checkpoint_path"], cfg["experiment_id"])


def _final_checkpoint(name):
    """The folder of the trainer's last update (from the config's checkpoint_path, experiment_id, updates)."""
    cfg = _read_config(name)
    path = os.path.join(_run_folder(name, cfg), f"step_{cfg['updates']:08d}")
    if not os.path.isdir(path):
        raise RuntimeError(f"{path} is missing after training {name}: did the run stop early?")
    return path


def export(src, dst, dtype=torch.float16):
    """Copy one model file, floating tensors cast to `dtype` (None keeps them), with its metadata."""
    from core.weights import load_state_dict_file, read_metadata, save_state_dict_file
    state = load_state_dict_file(src)
    save_state_dict_file(state, os.path.join(REPO, dst), metadata=read_metadata(src), dtype=dtype)
    print(f"[demo] exported {dst} ({os.path.getsize(os.path.join(REPO, dst)) / 1e6:.2f} MB)", flush=True)


def _train(name, script, exports):
    """Train (or resume) `configs/training/demo_<name>.yaml`, then export {file in step folder: (dst, dtype)}."""
    _run([os.path.join("train", script), _config(name)])
    step = _final_checkpoint(name)
    for src, (dst, dtype) in exports.items():
        candidates = [src] if isinstance(src, str) else list(src)
        found = [c for c in candidates if os.path.exists(os.path.join(step, c))]
        if not found:
            raise RuntimeError(f"none of {candidates} in {step}")
        export(os.path.join(step, found[0]), dst, dtype)


def stage_data():
    _run(["-m", "demo.make_dataset", DATA, "--num-train", str(NUM_TRAIN), "--num-heldout", str(NUM_HELDOUT),
          "--num-zorb", str(NUM_ZORB), "--image-size", str(IMAGE_SIZE)])
    shutil.copy(os.path.join(REPO, DATA, "heldout_prompts.json"), os.path.join(REPO, OUT, "heldout_prompts.json"))


def stage_a():
    _train("a", "train_a.py", {("generator_ema.safetensors", "generator.safetensors"):
                               (os.path.join(OUT, "stage_a.safetensors"), torch.float16)})


def stage_b():
    _train("b", "train_b.py", {("generator_ema.safetensors", "generator.safetensors"):
                               (os.path.join(OUT, "stage_b.safetensors"), torch.float16)})


def _write_cache(name, script, folder):
    """The trainer's `--write-cache`, which writes the folder whole or not at all (a killed run starts over)."""
    shutil.rmtree(os.path.join(REPO, folder), ignore_errors=True)
    _run([os.path.join("train", script), _config(name), "--write-cache", folder])


def stage_cache_b():
    _write_cache("b", "train_b.py", CACHE_B)


def stage_previewer():
    """The latent space: the Lite0 mapper trained with the Previewer (both exported; the mapper stays fp32)."""
    _train("previewer", "train_previewer.py", {
        "generator.safetensors": (os.path.join(OUT, "previewer.safetensors"), torch.float16),
        "effnet.safetensors": (os.path.join(OUT, "effnet.safetensors"), None)})


def stage_cache_c():
    _write_cache("c", "train_c.py", CACHE_C)


def stage_c():
    _train("c", "train_c.py", {("generator_ema.safetensors", "generator.safetensors"):
                               (os.path.join(OUT, "stage_c.safetensors"), torch.float16)})


def stage_controlnet():
    _train("controlnet_canny", "train_c_controlnet.py",
           {"controlnet.safetensors": (os.path.join(OUT, "controlnet_canny.safetensors"), torch.float16)})


def stage_lora():
    _train("lora_zorb", "train_c_lora.py", {"lora.safetensors": (os.path.join(OUT, "lora_zorb.safetensors"), None)})


def stage_evaluate():
    _run(["-m", "demo.evaluate_model", "--out", os.path.join(OUT, "eval.json")])


def stage_card():
    _run(["-m", "demo.model_card"])


# (name, what it leaves in models/demo, function)
STAGES = [
    ("data", "heldout_prompts.json", stage_data),
    ("stage_a", "stage_a.safetensors", stage_a),
    ("previewer", "effnet.safetensors", stage_previewer),
    ("cache_b", ("stage_b.safetensors", CACHE_B), stage_cache_b),
    ("stage_b", "stage_b.safetensors", stage_b),
    ("cache_c", ("stage_c.safetensors", CACHE_C), stage_cache_c),
    ("stage_c", "stage_c.safetensors", stage_c),
    ("controlnet", "controlnet_canny.safetensors", stage_controlnet),
    ("lora", "lora_zorb.safetensors", stage_lora),
    ("evaluate", "eval.json", stage_evaluate),
    ("card", "README.md", stage_card),
]


# the training config of each stage that trains (its run folder is what a rerun would otherwise resume)
TRAINED = {"stage_a": "a", "previewer": "previewer", "stage_b": "b", "stage_c": "c", "controlnet": "controlnet_canny",
           "lora": "lora_zorb"}


def discard_work(name):
    """Before a stage runs from scratch, remove what it would otherwise pick up: a training stage's checkpoints
    (its trainer resumes from them, so a redone stage would re-export the finished run), and for new data, every
    cache and checkpoint made from the old data (a cache folder counts as done)."""
    if name == "data":
        folders = [_run_folder(config) for config in TRAINED.values()] + [CACHE_B, CACHE_C]
    elif name in TRAINED:
        folders = [_run_folder(TRAINED[name])]
    else:
        folders = []
    for folder in folders:
        shutil.rmtree(os.path.join(REPO, folder), ignore_errors=True)


def _done(name, product):
    if isinstance(product, tuple):  # a cache: done when written, or when the stage that reads it is
        exported, folder = product
        return os.path.exists(os.path.join(REPO, OUT, exported)) or os.path.isdir(os.path.join(REPO, folder))
    return os.path.exists(os.path.join(REPO, OUT, product))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.build_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="start", choices=[s[0] for s in STAGES],
                        help="redo this stage and all later ones")
    parser.add_argument("--until", choices=[s[0] for s in STAGES], help="stop after this stage")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(REPO, OUT), exist_ok=True)
    log_path = os.path.join(REPO, LOG)
    log = json.load(open(log_path)) if os.path.exists(log_path) else {}
    names = [s[0] for s in STAGES]
    redo = set(names[names.index(args.start):]) if args.start else set()
    total = time.time()
    for name, product, function in STAGES:
        if name in redo or not _done(name, product):
            print(f"[demo] stage {name}", flush=True)
            if name in redo or name == "data":  # an interrupted stage keeps its checkpoints and resumes
                discard_work(name)
            start = time.time()
            function()
            # a resumed stage adds its time to what the interrupted attempt spent (the log keeps both)
            log[name] = {"seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            with open(log_path, "w") as f:
                json.dump(log, f, indent=1)
        else:
            print(f"[demo] stage {name}: done", flush=True)
        if name == args.until:
            break
    print(f"[demo] finished in {time.time() - total:.0f} s; stages: "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in log.items()), flush=True)


if __name__ == "__main__":
    main()
