"""The inference pipeline on the tiny preset (random weights, small CLIP): conditioning, settings, seeds, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from inference.config import ConfigError, load_pipeline_config
from inference.loading import load_pipeline
from inference.pipeline import PipelineError, StageSampling
from inference.utils import calculate_latent_sizes, load_image
from modules.gdf import GDF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "inference", "tiny.yaml")
FAST_C = StageSampling(steps=3, cfg=4.0, shift=2.0)
FAST_B = StageSampling(steps=2, cfg=1.1, shift=1.0)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY, device="cpu")


def run(pipe, **kw):
    kw.setdefault("height", 128)
    kw.setdefault("width", 128)
    kw.setdefault("stage_c", FAST_C)
    kw.setdefault("stage_b", FAST_B)
    return pipe.generate(**kw)


class Spy:
    """Records every call of a model's forward (args and kwargs), passing it through."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def close(self):
        self.handle.remove()


def test_stage_c_and_b_get_the_conditions_upstream_computes(pipe):
    prompt, negative = "a red square on a blue background", "blurry"
    c_spy, b_spy = Spy(pipe.stage_c), Spy(pipe.stage_b)
    try:
        out = run(pipe, prompt=prompt, negative_prompt=negative, seed=3)
    finally:
        c_spy.close(), b_spy.close()
    tokens = pipe.tokenizer([prompt, negative], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt")
    with torch.no_grad():
        ref = pipe.text_model(**tokens, output_hidden_states=True)
    args, kw = c_spy.calls[0]
    assert kw["clip_text"].shape[0] == 2  # one CFG pair: conditional first, unconditional second
    torch.testing.assert_close(kw["clip_text"], ref.hidden_states[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kw["clip_text_pooled"], ref.text_embeds[:, None], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(kw["clip_img"]) == 0
    assert len(c_spy.calls) == FAST_C.steps
    # Stage B: pooled text, and Stage C's final x0 as `effnet` (zeros for the unconditional half)
    args, kw = b_spy.calls[0]
    torch.testing.assert_close(kw["clip"], ref.text_embeds[:, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kw["effnet"][0], out.latents_c[0])
    assert torch.count_nonzero(kw["effnet"][1]) == 0


def test_empty_negative_prompt_is_the_empty_caption(pipe):
    spy = Spy(pipe.stage_c)
    try:
        run(pipe, prompt="x", seed=0)
    finally:
        spy.close()
    tokens = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = pipe.text_model(**tokens, output_hidden_states=True)
    torch.testing.assert_close(spy.calls[0][1]["clip_text"][1:], ref.hidden_states[-1], rtol=1e-5, atol=1e-6)


def test_variation_passes_clip_image_embeddings(pipe):
    image = torch.rand(1, 3, 96, 80)
    spy = Spy(pipe.stage_c)
    try:
        run(pipe, prompt="", variation_images=image, seed=1)
    finally:
        spy.close()
    from core.conditioning import encode_clip_image
    expect = encode_clip_image(pipe.vision_model, image)
    clip_img = spy.calls[0][1]["clip_img"]
    torch.testing.assert_close(clip_img[:1], expect)
    assert torch.count_nonzero(clip_img[1:]) == 0  # unconditional branch: zeros


@pytest.fixture
def gdf_spy(monkeypatch):
    calls = []
    original = GDF.sample

    def sample(self, model, model_inputs, shape, unconditional_inputs=None, **kw):
        calls.append(dict(kw, shape=tuple(shape), uncond=unconditional_inputs is not None))
        return original(self, model, model_inputs, shape, unconditional_inputs, **kw)
    monkeypatch.setattr(GDF, "sample", sample)
    return calls


def _sampler_name(call):
    return type(call["sampler"]).__name__


def test_settings_reach_gdf_unchanged_in_every_mode(pipe, gdf_spy):
    c = StageSampling(steps=4, cfg=3.0, shift=2.5, sampler="ddim", cfg_rho=0.5)
    b = StageSampling(steps=2, cfg=1.3, shift=1.0, sampler="ddpm", cfg_rho=0.7)
    run(pipe, prompt="t2i", seed=0, stage_c=c, stage_b=b, height=256, width=192)
    stage_c, stage_b = gdf_spy
    assert (stage_c["timesteps"], stage_c["cfg"], stage_c["shift"], stage_c["t_start"], stage_c["cfg_rho"]) == \
        (4, 3.0, 2.5, 1.0, 0.5)
    assert _sampler_name(stage_c) == "DDIMSampler" and stage_c["x_init"] is None
    assert stage_c["shape"] == calculate_latent_sizes(256, 192, 1)[0]
    assert (stage_b["timesteps"], stage_b["cfg"], stage_b["shift"], stage_b["t_start"]) == (2, 1.3, 1.0, 1.0)
    assert _sampler_name(stage_b) == "DDPMSampler" and stage_b["shape"] == (1, 4, 64, 48)

    gdf_spy.clear()
    run(pipe, prompt="v", seed=0, stage_c=c, stage_b=b, variation_images=torch.rand(1, 3, 64, 64))
    assert [g["timesteps"] for g in gdf_spy] == [4, 2] and gdf_spy[0]["t_start"] == 1.0

    gdf_spy.clear()
    run(pipe, prompt="i2i", seed=0, stage_c=c, stage_b=b, init_image=torch.rand(1, 3, 128, 128), strength=0.5)
    stage_c = gdf_spy[0]
    assert stage_c["t_start"] == 0.5 and stage_c["timesteps"] == int(4 * 0.5) and stage_c["shift"] == 2.5
    assert stage_c["x_init"] is not None and tuple(stage_c["x_init"].shape) == stage_c["shape"]

    gdf_spy.clear()
    pipe.reconstruct(torch.rand(1, 3, 128, 128), stage_b=b)
    (stage_b,) = gdf_spy
    assert (stage_b["timesteps"], stage_b["cfg"], stage_b["shift"]) == (2, 1.3, 1.0)
    assert stage_b["shape"] == (1, 4, 32, 32)


def test_image_to_image_noises_at_the_sampling_shift(pipe, monkeypatch):
    seen = []
    original = GDF.diffuse

    def diffuse(self, x0, *a, **kw):
        seen.append(kw.get("shift"))
        return original(self, x0, *a, **kw)
    monkeypatch.setattr(GDF, "diffuse", diffuse)
    run(pipe, prompt="x", seed=0, init_image=torch.rand(1, 3, 128, 128), strength=0.6,
        stage_c=StageSampling(steps=5, shift=2.0))
    assert seen == [2.0]


def test_each_mode_returns_the_requested_size(pipe):
    out = run(pipe, prompt=["a", "b"], num_images=2, seed=0, height=160, width=224)
    assert out.images.shape == (4, 3, 160, 224)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert run(pipe, prompt="x", seed=0, init_image=torch.rand(3, 100, 150), strength=0.7).images.shape == \
        (1, 3, 128, 128)
    assert run(pipe, prompt="", seed=0, variation_images=torch.rand(3, 64, 64)).images.shape == (1, 3, 128, 128)
    rec = pipe.reconstruct(torch.rand(2, 3, 128, 96), stage_b=FAST_B)
    assert rec.images.shape == (2, 3, 128, 96) and rec.latents_c.shape == (2, 16, 3, 2)


def test_seeds_are_reproducible_and_per_image(pipe):
    a = run(pipe, prompt="same", seed=11, num_images=3)
    b = run(pipe, prompt="same", seed=11, num_images=3)
    assert torch.equal(a.images, b.images)
    assert a.seeds == [11, 12, 13]
    other = run(pipe, prompt="same", seed=12)
    assert not torch.equal(a.images[0], other.images[0])
    # image i of the batch is the image that seed+i gives alone (1e-5 relative: CPU kernels vary with batch size)
    for batched, alone in ((a.images[1], other.images[0]), (a.latents_c[1], other.latents_c[0]),
                           (a.latents_b[1], other.latents_b[0])):
        assert ((batched - alone).norm() / alone.norm()).item() < 1e-5


def test_negative_prompt_and_strength_change_the_output(pipe):
    base = run(pipe, prompt="p", seed=5)
    neg = run(pipe, prompt="p", negative_prompt="something else", seed=5)
    assert (base.images - neg.images).abs().max() > 1e-4
    image = torch.rand(1, 3, 128, 128)
    s1 = run(pipe, prompt="p", seed=5, init_image=image, strength=0.4, stage_c=StageSampling(steps=10))
    s2 = run(pipe, prompt="p", seed=5, init_image=image, strength=0.9, stage_c=StageSampling(steps=10))
    assert (s1.latents_c - s2.latents_c).abs().max() > 1e-4
    # strength 0 keeps the input image's own EfficientNet latents
    s0 = run(pipe, prompt="p", seed=5, init_image=image, strength=0.0)
    resized = torch.nn.functional.interpolate(image, size=(96, 96), mode="bilinear", antialias=True)
    torch.testing.assert_close(s0.latents_c, pipe.encode_effnet(resized))


def test_bad_input_gets_clear_errors_or_documented_corrections(pipe, tmp_path):
    with pytest.warns(UserWarning, match="rounded to 128×160"):
        out = run(pipe, prompt="x", seed=0, height=130, width=150)
    assert out.images.shape[-2:] == (128, 160)
    for h in (16, 100000):
        with pytest.raises(PipelineError, match="outside the supported range"):
            run(pipe, prompt="x", height=h)
    with pytest.raises(PipelineError, match="integer"):
        run(pipe, prompt="x", height=128.5)
    with pytest.raises(PipelineError, match="strength"):
        run(pipe, prompt="x", init_image=torch.rand(3, 64, 64), strength=1.5)
    with pytest.raises(PipelineError, match="num_images"):
        run(pipe, prompt="x", num_images=0)
    with pytest.raises(PipelineError, match="negative prompts"):
        run(pipe, prompt=["a", "b", "c"], negative_prompt=["x", "y"])
    with pytest.raises(PipelineError, match="B×3×H×W"):
        run(pipe, prompt="x", init_image=torch.rand(1, 4, 64, 64))
    with pytest.warns(UserWarning, match="truncated"):
        run(pipe, prompt="very long " * 100, seed=0)
    assert run(pipe, prompt="", seed=0).images.shape == (1, 3, 128, 128)  # empty prompt is fine
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(str(corrupt))
    with pytest.raises(ValueError, match="not found"):
        load_image(str(tmp_path / "missing.png"))


def test_rgba_grayscale_and_16bit_images_are_converted(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(str(tmp_path / "rgba.png"))
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(x[:, -1, 0], torch.tensor([1.0, 1.0, 1.0]))
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(tmp_path / "gray.png")
    g = load_image(str(tmp_path / "gray.png"))
    assert g.shape == (3, 8, 8) and torch.allclose(g, torch.full_like(g, 128 / 255))
    Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    d = load_image(str(tmp_path / "deep.png"))
    assert d.shape == (3, 8, 8) and abs(d.mean().item() - 0.5) < 0.01


def test_missing_weights_and_bad_configs_name_the_fix(tmp_path):
    cfg = {"stage_c": {"model_version": "1B", "generator_checkpoint_path": str(tmp_path / "stage_c.safetensors")},
           "stage_b": {"model_version": "700M"}, "text_encoder_path": None}
    with pytest.raises(Exception, match="download_models.sh"):
        load_pipeline(cfg, device="cpu")
    with pytest.raises(ConfigError, match="stage_c_checkpoint"):
        load_pipeline_config({"stage_c": {"model_version": "1B", "stage_c_checkpoint": "x"}, "stage_b": "x.yaml"})
    with pytest.raises(ConfigError, match="missing required key"):
        load_pipeline_config({"stage_c": {"model_version": "1B"}})
    # upstream's own stage files load as they are (notebook-only keys accepted)
    cfg = load_pipeline_config(os.path.join(ROOT, "configs", "inference", "big-small.yaml"))
    assert (cfg.stage_c.model_version, cfg.stage_b.model_version) == ("1B", "3B")


def test_cli_writes_pngs_with_metadata(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "inference.generate", "--config", TINY, "--prompt", "a cat",
                           "--prompt", "a dog", "--num-images", "1", "--height", "128", "--width", "160",
                           "--seed", "7", "--steps-c", "2", "--steps-b", "2", "--negative-prompt", "ugly",
                           "--out", str(out), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = sorted(out.glob("*.png"))
    assert len(paths) == 2
    with Image.open(paths[1]) as im:
        assert im.size == (160, 128)
        meta = json.loads(im.text["parameters"])
    assert meta["prompt"] == "a dog" and meta["seed"] == 8 and meta["negative_prompt"] == "ugly"
    assert meta["stage_c"]["steps"] == 2 and meta["stage_b"]["cfg"] == 1.1 and meta["config"] == TINY
    bad = subprocess.run([sys.executable, "-m", "inference.generate", "--config", TINY, "--strength", "2",
                          "--image", str(paths[0]), "--out", str(out), "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "strength" in bad.stderr and "Traceback" not in bad.stderr


def test_without_config_the_cli_takes_the_downloaded_release_else_the_demo_model(tmp_path, monkeypatch):
    import shutil
    from inference.generate import DEFAULT_CONFIG, default_config
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    assert default_config() == DEFAULT_CONFIG
    # small-small's files: Stage C lite, Stage B lite, Stage A, EfficientNet and the text encoder folder
    for f in ("stage_c_lite_bf16.safetensors", "stage_b_lite_bf16.safetensors", "stage_a.safetensors",
              "effnet_encoder.safetensors", "text_encoder/config.json"):
        (tmp_path / "models" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / f).write_bytes(b"x")
    assert default_config() == "configs/inference/small-small.yaml"


def test_each_stage_samples_with_the_objective_its_file_records(tmp_path):
    """A stage trained here records `gdf_target`; the released files record none and predict epsilon."""
    from core.weights import save_model
    from modules.gdf import EpsilonTarget, VTarget
    from modules.presets import build_model
    from train.base import TINY
    paths = {}
    for kind, target in (("stage_c", "v"), ("stage_b", None)):
        paths[kind] = str(tmp_path / f"{kind}.safetensors")
        save_model(build_model(kind, TINY), paths[kind], metadata={"gdf_target": target} if target else None)
    config = {"random_weights": True, "text_encoder_path": None, "image_encoder_path": None,
              "stage_c": {"model_version": TINY, "generator_checkpoint_path": paths["stage_c"]},
              "stage_b": {"model_version": TINY, "generator_checkpoint_path": paths["stage_b"]}}
    pipe = load_pipeline(config, device="cpu")
    assert isinstance(pipe.gdf_c.target, VTarget) and isinstance(pipe.gdf_b.target, EpsilonTarget)
    x = torch.randn(2, 16, 3, 3)
    # v-prediction undone: the x0 the sampler would take from a model output of v equals a·x_t - b·v
    logSNR = torch.full((2,), 0.5)
    a, b = pipe.gdf_c.input_scaler(logSNR)
    v = torch.randn_like(x)
    x0 = pipe.gdf_c.undiffuse(x, logSNR, v)[0]
    torch.testing.assert_close(x0, a.view(-1, 1, 1, 1) * x - b.view(-1, 1, 1, 1) * v)


def test_stage_c_compression_sets_the_latent_size_and_the_reconstruction_scale(pipe, monkeypatch):
    """Upstream's 42.67 px per Stage C latent by default; a config's stage_c_compression (the demo's 8) changes
    the Stage C latents of a generation and the EfficientNet scale `reconstruct` uses by default."""
    assert pipe.stage_c_compression == 42.67 and pipe.effnet_stride == 32
    default = pipe.reconstruct(torch.rand(1, 3, 128, 128), stage_b=FAST_B)
    assert default.latents_c.shape[-2:] == (3, 3)  # ¾ of 128 = 96 px → 3×3
    monkeypatch.setattr(pipe, "stage_c_compression", 32)
    assert run(pipe, prompt="x", seed=0).latents_c.shape == (1, 16, 4, 4)
    assert pipe.reconstruct(torch.rand(1, 3, 128, 128), stage_b=FAST_B).latents_c.shape[-2:] == (4, 4)  # scale 1
    config = load_pipeline_config(TINY)
    assert config.stage_c_compression == 42.67
    assert load_pipeline_config(os.path.join(ROOT, "configs", "inference", "demo.yaml")).stage_c_compression == 8


def test_a_config_sets_the_clis_default_sampling_and_flags_still_win(tmp_path):
    """`sampling` in a pipeline config replaces upstream's settings key by key; a flag on the command line beats
    both. The PNG metadata records what was used."""
    import yaml
    from inference.config import default_sampling
    config = yaml.safe_load(open(TINY))
    config["sampling"] = {"stage_c": {"steps": 2}, "stage_b": {"steps": 1, "cfg": 1.7}}
    path = tmp_path / "tiny_sampling.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    metas = []
    for extra in ([], ["--cfg-b", "1.3", "--steps-c", "1"]):
        out = tmp_path / f"out{len(extra)}"
        proc = subprocess.run([sys.executable, "-m", "inference.generate", "--config", str(path), "--prompt", "a cat",
                               "--height", "128", "--width", "128", "--seed", "1", "--out", str(out), "--quiet",
                               *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        with Image.open(next(out.glob("*.png"))) as im:
            metas.append(json.loads(im.text["parameters"]))
    (c, b), (c2, b2) = [(m["stage_c"], m["stage_b"]) for m in metas]
    assert (c["steps"], c["cfg"], c["shift"]) == (2, 4.0, 2.0)  # steps from the config, the rest upstream's
    assert (b["steps"], b["cfg"], b["shift"]) == (1, 1.7, 1.0)
    assert (c2["steps"], b2["cfg"], b2["steps"]) == (1, 1.3, 1)
    demo_c, demo_b = default_sampling(os.path.join(ROOT, "configs", "inference", "demo.yaml"))
    assert (demo_c.steps, demo_c.cfg, demo_b.steps, demo_b.cfg) == (20, 4.0, 10, 2.0)
    with pytest.raises(ConfigError, match=r"sampling.stage_b: unknown key\(s\) \['cfgg'\]"):
        load_pipeline_config({**config, "sampling": {"stage_b": {"cfgg": 2}}})
    with pytest.raises(ConfigError, match="sampling maps stage_c and/or stage_b"):
        load_pipeline_config({**config, "sampling": {"stage_a": {}}})
