"""Local Gradio demo: text-to-image, image variation, image-to-image, ControlNets and LoRAs on one pipeline.

    python gradio_app/app.py                      # http://127.0.0.1:7860, the default model
    python gradio_app/app.py --port 8000 --device cpu

Every run is the CLI's: the form becomes `python -m inference.generate` arguments (shown under the images), which
`inference.generate.run` executes and `save_pngs` writes, so a seed gives the same pixels here and on the command
line. Images are served as the lossless PNGs written to --out, settings in their text chunks.
"""
import argparse
import functools
import os
import queue
import random
import shlex
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python gradio_app/app.py` puts gradio_app/ first on the path, not the repo root
    sys.path.insert(0, ROOT)

from inference.generate import DEFAULT_CONFIG, build_parser, run, save_pngs  # noqa: E402

DEFAULT_MODEL = DEFAULT_CONFIG  # the model the app opens with, first in the selector
CONFIG_DIR = os.path.join(ROOT, "configs", "inference")
CLI_DEFAULTS = build_parser().parse_args([])
MAX_SEED = 2**31 - 1
CONTROLNET_MODES = ("canny", "inpainting", "sr")
MODES = ("text-to-image", "variation", "image-to-image", *CONTROLNET_MODES)


def _rel(path):
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def list_models(config_dir=CONFIG_DIR):
    """DEFAULT_MODEL, then every pipeline config in `config_dir` whose weights are all on disk."""
    from inference.config import ConfigError, load_pipeline_config, weights_present
    models = [DEFAULT_MODEL]
    for name in sorted(os.listdir(config_dir)):
        path = _rel(os.path.join(config_dir, name))
        if not name.endswith(".yaml") or path == DEFAULT_MODEL:
            continue
        try:
            cfg = load_pipeline_config(os.path.join(config_dir, name))
        except (ConfigError, TypeError, KeyError, ValueError):
            continue  # a per-stage, ControlNet or LoRA config
        if weights_present(cfg):
            models.append(path)
    return models


def list_loras(config_dir=CONFIG_DIR, model_dir=os.path.join(ROOT, "models")):
    """LoRA configs whose file exists, then LoRA files (`*lora*.safetensors`) under `model_dir`."""
    from inference.lora import LoraError, read_lora_config
    found = []
    for name in sorted(os.listdir(config_dir)):
        if name.startswith("lora") and name.endswith(".yaml"):
            try:
                if os.path.isfile(read_lora_config(os.path.join(config_dir, name))["path"]):
                    found.append(_rel(os.path.join(config_dir, name)))
            except LoraError:
                continue
    for folder, _, files in sorted(os.walk(model_dir)):
        found += [_rel(os.path.join(folder, f)) for f in sorted(files)
                  if "lora" in f.lower() and f.endswith(".safetensors")]
    return found


def default_size(model):
    """The CLI's default side for a pipeline config (its `image_size`, else 1024)."""
    from inference.config import default_image_size
    return default_image_size(model)


def default_steps_and_cfg(model, mode="text-to-image"):
    """The CLI's (steps C, CFG C, steps B, CFG B) for a pipeline config and a tab: its `sampling`, else upstream's;
    on a ControlNet tab that ControlNet's own `sampling` over both (the demo's Canny ControlNet samples at CFG 2)."""
    from inference.config import default_sampling
    controlnet = None
    if mode in CONTROLNET_MODES:
        from inference.controlnet import controlnet_sampling
        controlnet = controlnet_sampling(model, mode)
    stage_c, stage_b = default_sampling(model, controlnet)
    return stage_c.steps, stage_c.cfg, stage_b.steps, stage_b.cfg


def cli_arguments(mode, model, prompt, negative, seed, height, width, num_images, steps_c, cfg_c, steps_b, cfg_b,
                  out, image=None, strength=0.8, mask=None, outpaint=False, control_strength=1.0, loras=()):
    """The form as `python -m inference.generate` arguments. `image` is the input file of every mode but
    text-to-image; `mask` an inpainting mask file; `loras` (path, scale) pairs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    if mode != "text-to-image" and not image:
        raise ValueError(f"{mode} needs an input image")
    argv = ["--config", model, "--prompt", prompt, "--negative-prompt", negative, "--seed", str(int(seed)),
            "--num-images", str(int(num_images)), "--steps-c", str(int(steps_c)), "--cfg-c", str(float(cfg_c)),
            "--steps-b", str(int(steps_b)), "--cfg-b", str(float(cfg_b)), "--out", out, "--quiet"]
    if mode != "sr":  # super resolution: the output is twice the control image
        argv += ["--height", str(int(height)), "--width", str(int(width))]
    if mode == "variation":
        argv += ["--variation", image]
    elif mode == "image-to-image":
        argv += ["--image", image, "--strength", str(float(strength))]
    elif mode in CONTROLNET_MODES:
        argv += ["--controlnet", mode, "--control-image", image, "--control-strength", str(float(control_strength))]
        argv += ["--mask", mask] if mask else []
        argv += ["--outpaint"] if outpaint else []
    for path, scale in loras:
        argv += ["--lora", path, "--lora-scale", str(float(scale))]
    return argv


def save_mask(editor_value, folder):
    """The strokes drawn on a gr.ImageMask (any opaque layer pixel) as a white-on-black PNG; None if none drawn."""
    import numpy as np
    from PIL import Image
    layers = [np.asarray(layer) for layer in (editor_value or {}).get("layers") or []]
    if not layers:
        return None
    drawn = np.any([layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.any(-1)
                    for layer in layers], axis=0)
    if not drawn.any():
        return None
    path = os.path.join(folder, "mask.png")
    Image.fromarray((drawn * 255).astype(np.uint8)).save(path)
    return path


def save_background(editor_value, folder):
    """The picture under the mask strokes as a PNG file; None if nothing was uploaded."""
    from PIL import Image
    background = (editor_value or {}).get("background")
    if background is None:
        return None
    path = os.path.join(folder, "control.png")
    Image.fromarray(background).convert("RGB").save(path)
    return path


class Runner:
    """One pipeline per config, loaded on first use; runs CLI arguments and streams Stage C previews."""

    def __init__(self, device=None):
        self.device, self.pipes, self.lock = device, {}, threading.Lock()

    def pipe(self, config):
        from inference.loading import load_pipeline
        with self.lock:  # the start-up preload and a first request may ask at once
            if config not in self.pipes:
                self.pipes[config] = load_pipeline(config, device=self.device)
            return self.pipes[config]

    def stream(self, argv, preview_every=1):
        """Yields ("preview", PIL image, caption) while sampling, then ("done", PNG paths, seconds)."""
        from inference.utils import to_pil
        args = build_parser().parse_args(argv)
        events, result = queue.Queue(), {}

        def callback(stage, step, total, latents, preview=None):
            if preview is not None:
                events.put(("preview", to_pil(preview[:1])[0], f"Stage {stage}: step {step}/{total}"))

        def work():
            start = time.time()
            pipe = self.pipe(args.config)
            loras = []
            try:
                loras = [pipe.load_lora(path, scale=scale) for path, scale in args.loras or []]
                out, prompts = run(pipe, args, callback=callback, preview_every=preview_every)
                result["value"] = ("done", save_pngs(out, prompts, args), time.time() - start)
            except Exception as e:  # handed to the UI thread, which shows it
                result["error"] = e
            finally:
                for lora in loras:  # the cached pipeline goes back to its base weights
                    lora.remove()
                events.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (event := events.get()) is not None:
            yield event
        if "error" in result:
            raise result["error"]
        yield result["value"]


def build_demo(runner, out_dir, models=None, loras=None):
    """The Blocks UI: shared settings on top, one tab per mode, results and the equivalent command below."""
    import gradio as gr
    models = models or list_models()
    loras = loras if loras is not None else list_loras()
    side = default_size(models[0])
    d = CLI_DEFAULTS
    first_steps_c, first_cfg_c, first_steps_b, first_cfg_b = default_steps_and_cfg(models[0])

    def generate(mode, model, prompt, negative, seed, randomize, height, width, num_images, steps_c, cfg_c, steps_b,
                 cfg_b, lora, lora_scale, variation_image, init_image, strength, canny_image, mask_editor, outpaint,
                 sr_image, control_strength):
        seed = random.randint(0, MAX_SEED) if randomize else int(seed)
        folder = tempfile.mkdtemp(prefix="cascade_inputs_")
        image, mask = {"variation": variation_image, "image-to-image": init_image, "canny": canny_image,
                       "sr": sr_image}.get(mode), None
        if mode == "inpainting":
            image, mask = save_background(mask_editor, folder), save_mask(mask_editor, folder)
        try:
            argv = cli_arguments(mode, model, prompt, negative, seed, height, width, num_images, steps_c, cfg_c,
                                 steps_b, cfg_b, out_dir, image=image, strength=strength, mask=mask,
                                 outpaint=outpaint, control_strength=control_strength,
                                 loras=[(lora, lora_scale)] if lora else [])
            command = "python -m inference.generate " + shlex.join(argv)
            for event in runner.stream(argv):
                if event[0] == "preview":
                    yield gr.skip(), event[1], seed, command, event[2]
                else:
                    yield event[1], gr.skip(), seed, command, f"{len(event[1])} image(s) in {event[2]:.1f}s"
        except (ValueError, FileNotFoundError) as e:  # the CLI's user errors (PipelineError, ConfigError, …)
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="Stable Cascade") as demo:
        gr.Markdown("# Stable Cascade\nStage C → Stage B → Stage A. One seed governs both sampling stages.")
        with gr.Row():
            model = gr.Dropdown(models, value=models[0], label="Model (pipeline config)", elem_id="model")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
            randomize = gr.Checkbox(value=True, label="Randomise seed", elem_id="randomize")
            height = gr.Slider(128, 2048, value=side, step=32, label="Height", elem_id="height")
            width = gr.Slider(128, 2048, value=side, step=32, label="Width", elem_id="width")
            num_images = gr.Slider(1, 8, value=d.num_images, step=1, label="Images", elem_id="num_images")
        with gr.Row():
            steps_c = gr.Slider(1, 60, value=first_steps_c, step=1, label="Stage C steps", elem_id="steps_c")
            cfg_c = gr.Slider(1, 15, value=first_cfg_c, step=0.1, label="Stage C CFG", elem_id="cfg_c")
            steps_b = gr.Slider(1, 40, value=first_steps_b, step=1, label="Stage B steps", elem_id="steps_b")
            cfg_b = gr.Slider(1, 5, value=first_cfg_b, step=0.1, label="Stage B CFG", elem_id="cfg_b")
        sliders = [steps_c, cfg_c, steps_b, cfg_b]
        # The sliders show what the CLI would use for the chosen model and tab: a ControlNet may set its own
        # sampling (the demo's Canny one samples Stage C at CFG 2), and the app always passes the sliders' values.
        mode = gr.State("text-to-image")  # the tab whose settings the sliders show
        controlnet_mode = gr.State("canny")  # the ControlNet sub-tab last chosen (shown when "ControlNet" is)
        model.change(lambda m, tab: (default_size(m), default_size(m), *default_steps_and_cfg(m, tab)),
                     [model, mode], [height, width, *sliders])

        def switch(model_path, old, new):
            """(mode, sliders) for a move from tab `old` to tab `new`: a slider whose default differs between them
            takes the new default; one whose default they share keeps what the user set."""
            before, after = default_steps_and_cfg(model_path, old), default_steps_and_cfg(model_path, new)
            return (new, *(a if a != b else gr.skip() for a, b in zip(after, before)))

        def on_select(tab, new=None):
            """`tab`.select moves the sliders to mode `new`; for the outer ControlNet tab (new None) to its
            sub-tab last chosen, and a sub-tab also becomes that."""
            if new is None:
                tab.select(lambda m, old, cn: switch(m, old, cn), [model, mode, controlnet_mode], [mode, *sliders])
            elif new in CONTROLNET_MODES:
                tab.select(lambda m, old: (*switch(m, old, new), new), [model, mode], [mode, *sliders, controlnet_mode])
            else:
                tab.select(lambda m, old: switch(m, old, new), [model, mode], [mode, *sliders])

        with gr.Tabs():
            with gr.Tab("Text to image", elem_id="tab-text-to-image") as tab:
                run_t2i = gr.Button("Run", variant="primary", elem_id="run-text-to-image")
            on_select(tab, "text-to-image")
            with gr.Tab("Image variation", elem_id="tab-variation") as tab:
                variation_image = gr.Image(type="filepath", label="Image")
                run_var = gr.Button("Run", variant="primary", elem_id="run-variation")
            on_select(tab, "variation")
            with gr.Tab("Image to image", elem_id="tab-image-to-image") as tab:
                init_image = gr.Image(type="filepath", label="Image")
                strength = gr.Slider(0, 1, value=d.strength, step=0.05, label="Strength")
                run_i2i = gr.Button("Run", variant="primary", elem_id="run-image-to-image")
            on_select(tab, "image-to-image")
            with gr.Tab("ControlNet", elem_id="tab-controlnet") as tab:
                control_strength = gr.Slider(0, 2, value=d.control_strength, step=0.05, label="Control strength")
                with gr.Tabs():
                    with gr.Tab("Canny edges", elem_id="tab-canny") as sub:
                        canny_image = gr.Image(type="filepath", label="Image")
                        run_canny = gr.Button("Run", variant="primary", elem_id="run-canny")
                    on_select(sub, "canny")
                    with gr.Tab("Inpainting", elem_id="tab-inpainting") as sub:
                        mask_editor = gr.ImageMask(type="numpy", label="Image: draw the region to fill")
                        outpaint = gr.Checkbox(label="Outpaint (fill outside the drawn region)")
                        run_inpaint = gr.Button("Run", variant="primary", elem_id="run-inpainting")
                    on_select(sub, "inpainting")
                    with gr.Tab("Super resolution", elem_id="tab-sr") as sub:
                        sr_image = gr.Image(type="filepath", label="Image (the output is twice its size)")
                        run_sr = gr.Button("Run", variant="primary", elem_id="run-sr")
                    on_select(sub, "sr")
            on_select(tab)
            with gr.Tab("LoRA"):
                lora = gr.Dropdown([("none", "")] + [(p, p) for p in loras], value="", label="LoRA",
                                   info="LoRA configs in configs/inference/ and LoRA files under models/")
                lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
                gr.Markdown("The LoRA applies to every tab's runs (Stage C and the text encoder).")
        with gr.Row():
            gallery = gr.Gallery(label="Images (PNG, settings in the file)", columns=4, elem_id="gallery")
            preview = gr.Image(label="Stage C preview", interactive=False, format="png", height=256,
                               elem_id="preview")
        status = gr.Markdown(elem_id="status")
        command = gr.Textbox(label="The same run on the command line", interactive=False, elem_id="command")
        inputs = [model, prompt, negative, seed, randomize, height, width, num_images, steps_c, cfg_c,
                  steps_b, cfg_b, lora, lora_scale, variation_image, init_image, strength, canny_image, mask_editor,
                  outpaint, sr_image, control_strength]
        for button, name in ((run_t2i, "text-to-image"), (run_var, "variation"), (run_i2i, "image-to-image"),
                             (run_canny, "canny"), (run_inpaint, "inpainting"), (run_sr, "sr")):
            button.click(functools.partial(generate, name), inputs, [gallery, preview, seed, command, status])
    return demo.queue(default_concurrency_limit=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (loopback by default)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "gradio"), help="folder for the PNGs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo: no telemetry
    runner = Runner(args.device)
    threading.Thread(target=runner.pipe, args=(DEFAULT_MODEL,), daemon=True).start()  # ready by the first click
    demo = build_demo(runner, args.out)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[args.out])


if __name__ == "__main__":
    main()
