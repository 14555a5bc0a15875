"""The Gradio demo: the form → CLI arguments, model and LoRA lists, masks, and a browser test (Debian's chromium
driven by Playwright) whose image is pixel-equal to the CLI's PNG for the same seed and settings."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from gradio_app import app
from inference.generate import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a small red circle on a blue background"
TINY = "configs/inference/tiny.yaml"
SETTINGS = ["--config", app.DEFAULT_MODEL, "--seed", "1234", "--height", "128", "--width", "160",
            "--steps-c", "2", "--steps-b", "1"]


def test_form_becomes_the_cli_arguments_of_each_mode():
    common = dict(model=app.DEFAULT_MODEL, prompt="p", negative="n", seed=7, height=128, width=160, num_images=2,
                  steps_c=3, cfg_c=4.0, steps_b=2, cfg_b=1.1, out="o")
    args = build_parser().parse_args(app.cli_arguments("text-to-image", **common))
    assert (args.prompts, args.negative_prompt, args.seed, args.height, args.width, args.num_images) == (
        ["p"], "n", 7, 128, 160, 2)
    assert (args.steps_c, args.cfg_c, args.steps_b, args.cfg_b, args.out) == (3, 4.0, 2, 1.1, "o")
    assert args.image is args.variation is args.controlnet is None
    assert build_parser().parse_args(app.cli_arguments("variation", image="v.png", **common)).variation == "v.png"
    i2i = build_parser().parse_args(app.cli_arguments("image-to-image", image="i.png", strength=0.3, **common))
    assert (i2i.image, i2i.strength) == ("i.png", 0.3)
    inpaint = build_parser().parse_args(app.cli_arguments("inpainting", image="c.png", mask="m.png", outpaint=True,
                                                          loras=[("l.safetensors", 0.5)], **common))
    assert (inpaint.controlnet, inpaint.control_image, inpaint.mask, inpaint.outpaint) == (
        "inpainting", "c.png", "m.png", True)
    assert inpaint.loras == [("l.safetensors", 0.5)]
    sr = build_parser().parse_args(app.cli_arguments("sr", image="s.png", **common))
    assert sr.controlnet == "sr" and sr.height is sr.width is None  # twice the control image
    with pytest.raises(ValueError, match="needs an input image"):
        app.cli_arguments("canny", **common)
    with pytest.raises(ValueError, match="unknown mode"):
        app.cli_arguments("sketch", **common)


def test_sliders_default_to_the_clis_sampling_of_each_tab():
    """On a ControlNet tab the ControlNet config's own `sampling` applies, as in the CLI: the demo's Canny ControlNet
    samples Stage C at CFG 2 where the demo pipeline uses 4; a model without such a config keeps its own."""
    from inference.config import default_sampling
    from inference.controlnet import controlnet_sampling
    assert app.default_steps_and_cfg(app.DEFAULT_MODEL) == (20, 4.0, 10, 2.0)
    assert app.default_steps_and_cfg(app.DEFAULT_MODEL, "variation") == (20, 4.0, 10, 2.0)
    assert app.default_steps_and_cfg(app.DEFAULT_MODEL, "canny") == (20, 2.0, 10, 2.0)
    assert controlnet_sampling(app.DEFAULT_MODEL, "inpainting") == {}  # the demo has no inpainting ControlNet
    assert app.default_steps_and_cfg(app.DEFAULT_MODEL, "inpainting") == (20, 4.0, 10, 2.0)
    tiny_c, tiny_b = default_sampling(TINY)
    assert app.default_steps_and_cfg(TINY, "canny") == (tiny_c.steps, tiny_c.cfg, tiny_b.steps, tiny_b.cfg)


def test_model_list_starts_with_the_default_and_keeps_only_configs_with_weights(tmp_path):
    (tmp_path / "tiny2.yaml").write_text("random_weights: true\nstage_c: {model_version: tiny}\n"
                                         "stage_b: {model_version: tiny}\n")
    weights = tmp_path / "c.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "missing.yaml").write_text(f"text_encoder_path: {weights}\nstage_c: {{model_version: 1B, "
                                           f"generator_checkpoint_path: {tmp_path}/absent.safetensors}}\n"
                                           "stage_b: {model_version: 700M}\n")
    (tmp_path / "controlnet_x.yaml").write_text("controlnet_blocks: [0]\n")
    models = app.list_models(str(tmp_path))
    assert models == [app.DEFAULT_MODEL, str(tmp_path / "tiny2.yaml")]
    released = app.list_models()
    assert released[0] == app.DEFAULT_MODEL and all(m.endswith(".yaml") for m in released)
    assert app.default_size("configs/inference/tiny.yaml") == 256  # the config's image_size
    assert app.default_size("configs/inference/big-big.yaml") == 1024


def test_lora_list_has_configs_whose_file_exists_and_lora_files(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "style_lora.safetensors").write_bytes(b"")
    (models / "stage_b.safetensors").write_bytes(b"")
    (tmp_path / "lora_ok.yaml").write_text(f"lora_checkpoint_path: {models}/sub/style_lora.safetensors\n")
    (tmp_path / "lora_absent.yaml").write_text("lora_checkpoint_path: absent.safetensors\n")
    assert app.list_loras(str(tmp_path), str(models)) == [
        str(tmp_path / "lora_ok.yaml"), str(models / "sub" / "style_lora.safetensors")]


def test_drawn_strokes_become_a_white_mask(tmp_path):
    layer = np.zeros((8, 10, 4), np.uint8)
    layer[2:4, 5:9] = (255, 255, 255, 255)
    background = np.full((8, 10, 4), 90, np.uint8)
    path = app.save_mask({"background": background, "layers": [layer]}, str(tmp_path))
    mask = np.asarray(Image.open(path))
    assert mask.shape == (8, 10) and mask[2:4, 5:9].min() == 255 and mask.sum() == 255 * 8
    assert app.save_mask({"background": background, "layers": [np.zeros_like(layer)]}, str(tmp_path)) is None
    picture = Image.open(app.save_background({"background": background}, str(tmp_path)))
    assert picture.mode == "RGB" and picture.size == (10, 8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """scikit-image's coffee as a 128² PNG and a 64² one (super resolution), and a drawn inpainting mask."""
    from skimage import data
    folder = tmp_path_factory.mktemp("pictures")
    coffee = Image.fromarray(data.coffee()).resize((128, 128))
    coffee.save(folder / "coffee.png")
    coffee.resize((64, 64)).save(folder / "small.png")
    layer = np.zeros((128, 128, 4), np.uint8)
    layer[32:96, 40:100, 3] = 255
    mask = app.save_mask({"layers": [layer]}, str(folder))
    return {"image": str(folder / "coffee.png"), "small": str(folder / "small.png"), "mask": mask}


@pytest.fixture(scope="module")
def runner():
    return app.Runner("cpu")


@pytest.mark.parametrize("mode", ["variation", "image-to-image", "canny", "inpainting", "sr"])
def test_every_tab_runs_through_the_cli_settings(mode, pictures, runner, tmp_path):
    """Each tab on the default model; inpainting and super resolution, which the demo model has no ControlNet for,
    on the tiny random-weight cascade."""
    image = pictures["small"] if mode == "sr" else pictures["image"]
    model = TINY if mode in ("inpainting", "sr") else app.DEFAULT_MODEL
    argv = app.cli_arguments(mode, model, PROMPT, "", 3, 128, 128, 1, 2, 4.0, 1, 1.1, str(tmp_path),
                             image=image, mask=pictures["mask"] if mode == "inpainting" else None)
    events = list(runner.stream(argv))
    steps = 1 if mode == "image-to-image" else 2  # image-to-image samples strength 0.8 of the 2 steps
    assert [e[2] for e in events if e[0] == "preview"] == [f"Stage C: step {i}/{steps}" for i in range(1, steps + 1)]
    kind, paths, _ = events[-1]
    assert kind == "done" and Image.open(paths[0]).size == (128, 128)  # sr: twice the 64² picture
    recorded = json.loads(Image.open(paths[0]).info["parameters"])
    assert recorded["seed"] == 3 and recorded.get("controlnet", recorded["mode"]) == mode
    assert os.path.exists(paths[0][:-4] + "_control.png") == (mode in ("canny", "inpainting", "sr"))


def test_a_chosen_lora_changes_the_image_and_leaves_the_cached_pipeline_as_it_was(runner, tmp_path):
    import copy

    import torch
    from torch import nn

    from core.weights import save_state_dict_file
    from inference.lora import lora_metadata
    from modules.lora import apply_lora
    stage_c = copy.deepcopy(runner.pipe(app.DEFAULT_MODEL).stage_c)
    adapters = apply_lora(stage_c, [".attn"], rank=2)
    with torch.no_grad():
        for p in (p for a in adapters for p in a.parameters()):
            p.normal_(0, 0.3)
    lora = tmp_path / "style_lora.safetensors"
    save_state_dict_file(nn.ModuleDict({"weights": nn.ModuleList(adapters)}).state_dict(), lora,
                         metadata=lora_metadata([], [".attn"], rank=2))

    def pixels(loras=()):
        argv = app.cli_arguments("text-to-image", app.DEFAULT_MODEL, PROMPT, "", 5, 128, 128, 1, 2, 4.0, 1, 1.1,
                                 str(tmp_path), loras=loras)
        return np.asarray(Image.open(list(runner.stream(argv))[-1][1][0]))

    base = pixels()
    assert not np.array_equal(pixels([(str(lora), 1.0)]), base)
    assert runner.pipe(app.DEFAULT_MODEL).loras == [] and np.array_equal(pixels(), base)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url, process, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {timeout}s")


def test_browser_run_shows_the_clis_pixels(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh (as root) first")
    from playwright.sync_api import sync_playwright
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    # app and CLI start side by side, one thread each (the tiny models gain nothing from more)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "gradio_app/app.py", "--port", str(port), "--device", "cpu",
                               "--out", str(tmp_path / "app")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    cli = subprocess.run([sys.executable, "-m", "inference.generate", "--prompt", PROMPT, "--out",
                          str(tmp_path / "cli"), "--quiet", "--device", "cpu"] + SETTINGS,
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        _wait_for(url, server, timeout=90)
        with sync_playwright() as p:
            # a fresh profile (--user-data-dir): Playwright takes it as the persistent context's folder
            browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#randomize input").uncheck()
            for elem_id, value in (("seed", 1234), ("height", 128), ("width", 160), ("steps_c", 2), ("steps_b", 1)):
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            page.locator("#run-text-to-image").click()
            image = page.locator("#gallery img").first
            image.wait_for(timeout=60_000)
            png = urllib.request.urlopen(image.get_attribute("src")).read()
            assert page.locator("#preview img").count() == 1  # the last Stage C preview stays shown
            assert "1 image(s)" in page.locator("#status").inner_text()
            assert "--seed 1234" in page.locator("#command textarea").input_value()
            # the ControlNet tab shows the Canny ControlNet's CFG; the steps the user set stay
            from playwright.sync_api import expect
            cfg_c, steps_c = page.locator("#cfg_c input[type=number]"), page.locator("#steps_c input[type=number]")
            expect(cfg_c).to_have_value("4")
            page.get_by_role("tab", name="ControlNet").click()
            expect(cfg_c).to_have_value("2")
            expect(steps_c).to_have_value("2")
            page.get_by_role("tab", name="Text to image").click()
            expect(cfg_c).to_have_value("4")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    cli_png = cli.stdout.strip().splitlines()[-1]
    with open(tmp_path / "app.png", "wb") as f:
        f.write(png)
    served, expected = Image.open(tmp_path / "app.png"), Image.open(cli_png)
    assert served.format == "PNG" and served.size == expected.size == (160, 128)
    assert np.array_equal(np.asarray(served), np.asarray(expected))
    assert '"seed": 1234' in served.info["parameters"]  # the app's own PNG, settings included
