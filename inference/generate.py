"""Command line: text-to-image, image variation, image-to-image and A+B reconstruction.

    python -m inference.generate --prompt "a large red star in the top left on a blue background" --out outputs/

Each PNG carries the prompt, seed and every setting in its text chunks (key `parameters`, JSON).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

DEFAULT_PROMPT = "a large red star in the top left on a blue background"
# The model used when none is named (CLI, Gradio app, notebooks): the embedded demo cascade (models/demo), 128²
# scenes of simple shapes, trained by this repository and shipped with it.
DEFAULT_CONFIG = "configs/inference/demo.yaml"
# Without --config the CLI takes the first of these whose weights are downloaded, else DEFAULT_CONFIG.
RELEASED_CONFIGS = [f"configs/inference/{v}.yaml" for v in ("big-big", "big-small", "small-big", "small-small")]


def default_config():
    from inference.config import load_pipeline_config, weights_present
    for path in RELEASED_CONFIGS:
        if weights_present(load_pipeline_config(path)):
            return path
    return DEFAULT_CONFIG


class _AddLora(argparse.Action):
    """--lora PATH starts an entry at scale 1; a --lora-scale after it sets that entry's scale."""

    def __call__(self, parser, namespace, value, option_string=None):
        if self.dest == "loras":
            namespace.loras = (namespace.loras or []) + [(value, 1.0)]
        elif not namespace.loras:
            parser.error("--lora-scale must follow the --lora it scales")
        else:
            namespace.loras[-1] = (namespace.loras[-1][0], value)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="pipeline YAML (configs/inference/{big-big,big-small,small-big,small-small,demo,tiny}.yaml); "
                        f"default: the first released variant that is downloaded, else {DEFAULT_CONFIG}")
    p.add_argument("--prompt", action="append", dest="prompts", default=None,
                   help=f"text prompt; repeat --prompt for several (default: '{DEFAULT_PROMPT}')")
    p.add_argument("--negative-prompt", default="", help="text for the unconditional branch (both stages)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: the config's image_size, else 1024)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: the config's image_size, else 1024)")
    p.add_argument("--seed", type=int, default=None, help="seed of image 0; image i uses seed+i (random if unset)")
    defaults = " (default: the config's sampling, else {})"
    p.add_argument("--steps-c", type=int, default=None, help="Stage C sampling steps" + defaults.format(20))
    p.add_argument("--cfg-c", type=float, default=None, help="Stage C classifier-free guidance" + defaults.format(4.0))
    p.add_argument("--shift-c", type=float, default=None, help="Stage C noise-schedule shift" + defaults.format(2.0))
    p.add_argument("--steps-b", type=int, default=None, help="Stage B sampling steps" + defaults.format(10))
    p.add_argument("--cfg-b", type=float, default=None, help="Stage B classifier-free guidance" + defaults.format(1.1))
    p.add_argument("--shift-b", type=float, default=None, help="Stage B noise-schedule shift" + defaults.format(1.0))
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "lcm"], help="sampler for both stages")
    p.add_argument("--cfg-rho", type=float, default=0.7, help="CFG rescale factor (0 = plain CFG)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype; default: the config's, else bf16 on CUDA and fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--offload", action="store_true", help="keep each stage on the CPU until it runs")
    p.add_argument("--image", default=None, help="image-to-image: the input image file")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how far to noise the input (0–1)")
    p.add_argument("--variation", default=None, help="image variation: condition on this image's CLIP embedding")
    p.add_argument("--reconstruct", default=None,
                   help="Stages A+B as an autoencoder: reconstruct this image through 16-ch EfficientNet latents")
    p.add_argument("--compression", type=float, default=None,
                   help="reconstruction: EfficientNet input scale (default: the scale Stage C generates at, "
                        "0.75 for the released models)")
    p.add_argument("--out", default="outputs", help="output folder for the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--lora", action=_AddLora, dest="loras", default=None, metavar="PATH",
                   help="a LoRA file for Stage C, or a LoRA config naming one and its train_tokens (released files "
                        "need them: configs/inference/lora_c_3b.yaml); repeat for several")
    p.add_argument("--lora-scale", action=_AddLora, dest="lora_scale", type=float, metavar="F",
                   help="scale of the --lora just before it (default 1.0)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRAs into the weights: faster sampling")
    p.add_argument("--controlnet", default=None, metavar="NAME",
                   help="canny, inpainting, sr or identity (its config for the pipeline's Stage C in "
                        "configs/inference/), or a ControlNet config .yaml; needs --control-image")
    p.add_argument("--control-image", default=None,
                   help="ControlNet input: the image for edges, inpainting or super resolution (output: 2× its size)")
    p.add_argument("--mask", default=None, help="inpainting: a mask image, white where to fill (default: the "
                                                "saliency network's salient region)")
    p.add_argument("--outpaint", action="store_true", help="inpainting: fill outside the mask instead")
    p.add_argument("--control-strength", type=float, default=1.0, help="scale of the ControlNet's residuals")
    return p


def png_info(settings, seed, prompt, negative):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    record = dict(settings, seed=seed, prompt=prompt, negative_prompt=negative)
    record.pop("seeds", None)
    info.add_text("parameters", json.dumps(record, default=str))
    info.add_text("prompt", prompt or "")
    info.add_text("seed", str(seed))
    return info


def _progress(quiet):
    if quiet:
        return None
    from tqdm import tqdm
    bars = {}

    def callback(stage, step, total, latents, preview=None):
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"Stage {stage}", leave=True, file=sys.stderr)
        bars[stage].update(1)
        if step == total:
            bars.pop(stage).close()
    return callback


def run(pipe, args, callback=None, preview_every=0):
    """Parsed CLI settings → one pipeline call: (CascadeOutput, prompt of each image). The Gradio app calls this too,
    so the same settings and seed give the same pixels in both."""
    from inference.config import default_image_size, default_sampling, load_pipeline_config
    from inference.utils import load_image
    prompts = args.prompts or [DEFAULT_PROMPT]
    config = load_pipeline_config(args.config)  # read once for its defaults: size and sampling
    side = default_image_size(config)
    height, width = args.height or side, args.width or side
    control = {}
    if args.controlnet or args.control_image or args.mask or args.outpaint:
        if not (args.controlnet and args.control_image):
            raise ValueError("--controlnet and --control-image go together (--mask and --outpaint need both)")
        from inference.controlnet import load_controlnet, load_mask
        controlnet = load_controlnet(pipe, args.controlnet)
        image = load_image(args.control_image)
        if controlnet.output_scale != 1:  # super resolution: the control image sets the size
            height, width = (args.height or round(image.shape[-2] * controlnet.output_scale / 32) * 32,
                             args.width or round(image.shape[-1] * controlnet.output_scale / 32) * 32)
        control = dict(controlnet=controlnet, control_image=image, outpaint=args.outpaint,
                       control_mask=load_mask(args.mask) if args.mask else None,
                       control_strength=args.control_strength)
    default_c, default_b = default_sampling(config, control.get("controlnet"))

    def sampling(default, steps, cfg, shift):  # a flag left unset keeps the config's setting
        given = {k: v for k, v in dict(steps=steps, cfg=cfg, shift=shift).items() if v is not None}
        return dataclasses.replace(default, **given, sampler=args.sampler, cfg_rho=args.cfg_rho)

    stage_c = sampling(default_c, args.steps_c, args.cfg_c, args.shift_c)
    stage_b = sampling(default_b, args.steps_b, args.cfg_b, args.shift_b)
    if args.reconstruct:
        out = pipe.reconstruct(load_image(args.reconstruct), compression=args.compression,
                               seed=args.seed or 0, stage_b=stage_b, callback=callback)
        return out, [""]
    kwargs = {}
    if args.image:
        kwargs.update(init_image=load_image(args.image), strength=args.strength)
    if args.variation:
        kwargs.update(variation_images=load_image(args.variation))
    out = pipe.generate(prompts, negative_prompt=args.negative_prompt, num_images=args.num_images,
                        height=height, width=width, seed=args.seed, stage_c=stage_c, stage_b=stage_b,
                        callback=callback, preview_every=preview_every, **kwargs, **control)
    return out, out.settings["prompt"]


def save_pngs(out, prompts_per_image, args):
    """Writes each image as a PNG (settings in its text chunks) into args.out, never overwriting; returns the paths."""
    from inference.utils import to_pil
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil(out.images)):
        seed = out.seeds[i]
        stem = os.path.join(args.out, f"{time.strftime('%Y%m%d-%H%M%S')}_{i:02d}_seed{seed}")
        path, n = stem + ".png", 1
        while os.path.exists(path):  # never overwrite an earlier output
            path, n = f"{stem}-{n}.png", n + 1
        settings = dict(out.settings, config=args.config)
        image.save(path, pnginfo=png_info(settings, seed, prompts_per_image[i], args.negative_prompt))
        if out.control is not None:  # what the ControlNet saw (edges, masked image), beside the image
            to_pil(out.control[i:i + 1])[0].save(path[:-len(".png")] + "_control.png")
        paths.append(path)
    return paths


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.config = args.config or default_config()
    import torch  # noqa: F401  (imported after parsing so --help is instant)
    from inference.loading import load_pipeline

    pipe = load_pipeline(args.config, device=args.device, dtype=args.dtype, offload=args.offload)
    for path, scale in args.loras or []:
        pipe.load_lora(path, scale=scale, merge=args.merge_lora)
    callback = _progress(args.quiet)
    start = time.time()
    out, prompts_per_image = run(pipe, args, callback=callback)
    paths = save_pngs(out, prompts_per_image, args)
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {time.time() - start:.1f}s → {args.out}", file=sys.stderr)
    return paths


def cli():
    from core.conditioning import ConditioningError
    from inference.config import ConfigError
    from inference.pipeline import PipelineError
    try:
        main()
    except (ConfigError, PipelineError, ConditioningError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
