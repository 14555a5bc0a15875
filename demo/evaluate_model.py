"""Score the demo cascade in models/demo with the scene detector and write eval.json and the model card.

    python -m demo.evaluate_model [--config configs/inference/demo.yaml] [--n 300] [--out models/demo/eval.json]

- held-out prompts (attribute triples never trained on): accuracy per attribute, 95% Wilson intervals, chance;
  the detector's own accuracy on the ground-truth renders of the same prompts;
- Stage A and Stages A+B as autoencoders: PSNR on held-out renders;
- the Canny ControlNet: IoU of the dilated edge maps of the generated image and the control image, beside the
  same prompts and seeds without it and Stage B's own A+B reconstruction of the control scene (its ceiling);
- the '[zorb]' LoRA: how often '[zorb]' prompts draw the zorb, and whether prompts without the token change;
- seconds per image on this machine.
"""
import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from demo.detector import detect
from demo.evaluate import canny_edges, dilated_iou, lora_token_accuracy, proportion, psnr, score
from demo.make_dataset import SPLIT_SEEDS
from demo.scenes import Scene, parse_caption, prompt_records, sample_heldout_scenes, sample_zorb_scenes
from inference.config import default_sampling, load_pipeline_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "inference", "demo.yaml")
CONTROLNET = os.path.join("configs", "inference", "controlnet_demo_canny.yaml")
LORA = os.path.join("models", "demo", "lora_zorb.safetensors")
SIZE = 128
# the attributes issue #9 sets accuracy targets for (size has none: its classes lie 0.04 of the side apart)
CHECKED = ("shape", "colour", "position", "background")
# the demo's sampling settings: its config's, which the CLI and the app use for this model too (read once)
PIPELINE_CONFIG = load_pipeline_config(os.path.join(REPO, CONFIG))
STAGE_C, STAGE_B = default_sampling(PIPELINE_CONFIG)


def load_demo(config=CONFIG, device="cpu"):
    from inference.loading import load_pipeline
    return load_pipeline(os.path.join(REPO, config) if not os.path.exists(config) else config, device=device,
                         dtype=torch.float32)


def generate(pipe, prompts, first_seed, sampling=None, **kwargs):
    """PIL images of `prompts`, image i from seed first_seed + i (the pipeline's rule), at the demo size, sampled
    as the CLI would: the config's settings, and a ControlNet's own over them (`sampling`: these instead)."""
    stage_c, stage_b = sampling or default_sampling(PIPELINE_CONFIG, kwargs.get("controlnet"))
    out = pipe.generate(list(prompts), seed=first_seed, height=SIZE, width=SIZE, stage_c=stage_c, stage_b=stage_b,
                        **kwargs)
    return out.pil()


def _batches(records, size):
    for start in range(0, len(records), size):
        batch = records[start:start + size]
        seeds = [r["seed"] for r in batch]
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError("prompt records must have consecutive seeds (make_dataset writes 0, 1, 2, ...)")
        yield batch


def heldout_accuracy(pipe, records, batch_size=50):
    """Scores per attribute, and the images (the ControlNet's reference without it: same prompts and seeds)."""
    images = []
    for batch in _batches(records, batch_size):
        images += generate(pipe, [r["prompt"] for r in batch], batch[0]["seed"])
    return score([detect(image) for image in images], [r["attributes"] for r in records]), images


def _to_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for i in images])


@torch.inference_mode()
def reconstruction_psnr(pipe, renders):
    """Mean PSNR of Stage A alone (encode → decode) and of Stages A+B (EfficientNet latents → Stage B → A), and
    the A+B images: their edges against the renders' are the best a ControlNet on Stage C could reach."""
    from inference.utils import to_pil
    x = _to_tensor(renders)
    stage_a = pipe.stage_a.decode(pipe.stage_a.encode(x.to(pipe.device))[0]).float().clamp(0, 1).cpu()
    ab = to_pil(pipe.reconstruct(x, stage_b=STAGE_B, seed=0).images)
    return {"stage_a_psnr_db": float(np.mean([psnr(r, o) for r, o in zip(renders, to_pil(stage_a))])),
            "stage_ab_psnr_db": float(np.mean([psnr(r, o) for r, o in zip(renders, ab)])), "n": len(renders)}, ab


def controlnet_iou(pipe, records, without, reconstructed, batch_size=25):
    """Each held-out scene's render is the control image, its caption the prompt. `without`: the images of the same
    prompts and seeds without the ControlNet at the pipeline's settings; `reconstructed`: the renders through
    Stages A+B. When the ControlNet's config sets other sampling settings, the images without it at those settings
    are scored too, so that what the ControlNet adds is told apart from what the settings do."""
    from inference.controlnet import load_controlnet
    controlnet = load_controlnet(pipe, os.path.join(REPO, CONTROLNET))
    sampling = default_sampling(PIPELINE_CONFIG, controlnet)
    renders = [Scene(**parse_caption(r["prompt"]), variant=r["seed"]).render(SIZE) for r in records]
    control, edges = _to_tensor(renders), [canny_edges(render) for render in renders]
    images, plain = [], []
    for i, r in enumerate(records):  # one control image per prompt
        images += generate(pipe, [r["prompt"]], r["seed"], sampling=sampling, controlnet=controlnet,
                           control_image=control[i:i + 1])
    if sampling != (STAGE_C, STAGE_B):
        for batch in _batches(records, batch_size):
            plain += generate(pipe, [r["prompt"] for r in batch], batch[0]["seed"], sampling=sampling)

    def iou(generated):  # against the first len(records) images of `generated`
        return float(np.mean([dilated_iou(canny_edges(g), e) for g, e in zip(generated, edges)]))
    return {"edge_iou_mean": iou(images), "n": len(images), "dilation_radius_px": 2,
            "stage_c_sampling": vars(sampling[0]),
            "edge_iou_without_controlnet": iou(without),
            "edge_iou_without_controlnet_same_settings": iou(plain or without),
            "edge_iou_ab_reconstruction": iou(reconstructed)}


def lora_effect(pipe, zorb_records, base_records):
    """Token accuracy with the LoRA; without it as the baseline; and prompts without the token, with and without."""
    base_prompts = [r["prompt"] for r in base_records]
    zorb_prompts = [r["prompt"] for r in zorb_records]
    without_zorb = generate(pipe, zorb_prompts, zorb_records[0]["seed"])
    without_base = generate(pipe, base_prompts, base_records[0]["seed"])
    lora = pipe.load_lora(os.path.join(REPO, LORA))
    try:
        with_zorb = generate(pipe, zorb_prompts, zorb_records[0]["seed"])
        with_base = generate(pipe, base_prompts, base_records[0]["seed"])
    finally:
        lora.remove()
    before, after = [detect(i).attributes() for i in without_base], [detect(i).attributes() for i in with_base]
    same = sum(a == b for a, b in zip(before, after))
    same_checked = sum(all(a[k] == b[k] for k in CHECKED) for a, b in zip(before, after))
    diff = float(np.mean([np.abs(_to_tensor([a]) - _to_tensor([b])).mean().item()
                          for a, b in zip(without_base, with_base)]))
    return {"token_accuracy": lora_token_accuracy(with_zorb),
            "token_accuracy_without_lora": lora_token_accuracy(without_zorb),
            "base_prompts_same_detection": proportion(same, len(base_records)),
            "base_prompts_same_shape_colour_position_background": proportion(same_checked, len(base_records)),
            "base_prompts_mean_abs_pixel_change": diff,
            "base_accuracy_with_lora": score([detect(i) for i in with_base], [r["attributes"] for r in base_records]),
            "base_accuracy_without_lora": score([detect(i) for i in without_base],
                                                [r["attributes"] for r in base_records])}


def timing(pipe, repeats=3):
    """Seconds for one 128² image from a loaded pipeline (median of `repeats`)."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        generate(pipe, ["a large red circle in the center on a blue background"], i)
        times.append(time.perf_counter() - start)
    return {"seconds_per_image": float(np.median(times)), "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.evaluate_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--n", type=int, default=300, help="held-out prompts (≥ 300 for ±6%% intervals)")
    parser.add_argument("--n-control", type=int, default=100, help="held-out scenes for the ControlNet")
    parser.add_argument("--n-lora", type=int, default=100, help="'[zorb]' prompts and prompts without it")
    parser.add_argument("--out", default=os.path.join("models", "demo", "eval.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    pipe = load_demo(args.config)
    load_seconds = time.perf_counter() - start
    records = prompt_records(sample_heldout_scenes(args.n, [0, SPLIT_SEEDS["heldout"]]))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
              "torch": torch.__version__, "image_size": SIZE, "stage_c_sampling": vars(STAGE_C),
              "stage_b_sampling": vars(STAGE_B), "load_seconds": load_seconds}
    renders = [Scene(**parse_caption(r["prompt"]), variant=r["seed"]).render(SIZE) for r in records]
    result["detector_on_renders"] = score([detect(image) for image in renders], [r["attributes"] for r in records])
    print("[eval] detector on the prompts' renders:",
          {k: round(v["accuracy"], 3) for k, v in result["detector_on_renders"].items()}, flush=True)
    result["timing"] = timing(pipe)
    print(f"[eval] {result['timing']['seconds_per_image']:.2f} s per image", flush=True)
    result["heldout"], heldout_images = heldout_accuracy(pipe, records)
    print("[eval] held-out:", {k: round(v["accuracy"], 3) for k, v in result["heldout"].items()}, flush=True)
    result["reconstruction"], reconstructed = reconstruction_psnr(pipe, renders[:max(100, args.n_control)])
    print("[eval] reconstruction:", result["reconstruction"], flush=True)
    result["controlnet_canny"] = controlnet_iou(pipe, records[:args.n_control], heldout_images, reconstructed)
    print("[eval] controlnet:", result["controlnet_canny"], flush=True)
    zorbs = prompt_records(sample_zorb_scenes(args.n_lora, [0, SPLIT_SEEDS["zorb_prompts"]]))
    result["lora_zorb"] = lora_effect(pipe, zorbs, records[:args.n_lora])
    print("[eval] lora:", {k: v for k, v in result["lora_zorb"].items() if "accuracy" not in k or "token" in k},
          flush=True)
    with open(os.path.join(REPO, args.out) if not os.path.isabs(args.out) else args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"[eval] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
