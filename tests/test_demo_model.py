"""The shipped demo cascade (models/demo): it loads offline, fits its size budget, and follows prompts it never
trained on. 8 held-out prompts from fixed seeds are read back by the scene detector in well under a minute; the
ControlNet and the LoRA load through the same pipeline and act."""
import json
import os
import time

import numpy as np
import pytest
import torch

from demo.detector import ZORB, detect
from demo.evaluate import canny_edges, dilated_iou, load_prompts
from demo.evaluate_model import CHECKED, CONFIG, CONTROLNET, LORA, generate, load_demo
from demo.scenes import Scene, parse_caption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "demo")
WEIGHTS = ["controlnet_canny.safetensors", "effnet.safetensors", "lora_zorb.safetensors", "previewer.safetensors",
           "stage_a.safetensors", "stage_b.safetensors", "stage_c.safetensors"]


@pytest.fixture(scope="module")
def pipe():
    with torch.random.fork_rng(devices=[]):
        return load_demo(os.path.join(ROOT, CONFIG))


@pytest.fixture(scope="module")
def evaluation():
    """What `python -m demo.evaluate_model` measured for the model card."""
    with open(os.path.join(DEMO, "eval.json")) as f:
        return json.load(f)


def test_demo_files_fit_the_budget_and_hold_no_encoder_weights():
    assert sorted(f for f in os.listdir(DEMO) if f.endswith(".safetensors")) == WEIGHTS
    assert sum(os.path.getsize(os.path.join(DEMO, f)) for f in WEIGHTS) <= 20e6
    from core.weights import load_state_dict_file
    # Lite0's ImageNet weights stay in their package: the file holds only the mapper trained here
    assert not any(k.startswith("backbone.") for k in load_state_dict_file(os.path.join(DEMO, "effnet.safetensors")))


def test_recorded_evaluation_meets_the_prompt_adherence_targets(evaluation):
    held = evaluation["heldout"]
    assert all(held[k]["n"] >= 300 for k in CHECKED)
    assert held["colour"]["accuracy"] >= 0.85 and held["position"]["accuracy"] >= 0.80
    assert held["background"]["accuracy"] >= 0.90 and held["shape"]["accuracy"] >= 0.70
    assert evaluation["detector_on_renders"]["all"]["accuracy"] >= 0.98
    assert evaluation["lora_zorb"]["token_accuracy"]["accuracy"] >= 0.70
    # prompts without the token do not change: the token-gated LoRA leaves them to the base model
    unchanged = evaluation["lora_zorb"]["base_prompts_same_detection"]
    assert unchanged["n"] >= 100 and unchanged["accuracy"] == 1.0
    assert evaluation["lora_zorb"]["base_prompts_mean_abs_pixel_change"] == 0.0
    assert evaluation["timing"]["seconds_per_image"] < 10


def test_recorded_controlnet_edge_agreement_meets_the_target(evaluation):
    cn = evaluation["controlnet_canny"]
    assert cn["n"] >= 100 and cn["edge_iou_mean"] >= 0.5
    assert cn["edge_iou_mean"] > cn["edge_iou_without_controlnet_same_settings"]


def test_held_out_prompts_are_followed(pipe):
    records = load_prompts(os.path.join(DEMO, "heldout_prompts.json"))[:8]
    assert [r["seed"] for r in records] == list(range(records[0]["seed"], records[0]["seed"] + 8))
    start = time.perf_counter()
    images = generate(pipe, [r["prompt"] for r in records], records[0]["seed"])
    seconds = time.perf_counter() - start
    assert [im.size for im in images] == [(128, 128)] * 8
    detections = [detect(image).attributes() for image in images]
    passed = [all(d[k] == r["attributes"][k] for k in CHECKED) for d, r in zip(detections, records)]
    assert sum(passed) >= 5, list(zip([r["prompt"] for r in records], detections))
    assert seconds < 60


def test_same_seed_same_image_and_the_prompt_matters(pipe):
    prompt = ["a large yellow star in the center on a purple background"]
    a, b = (generate(pipe, prompt, 3)[0] for _ in range(2))
    assert a.tobytes() == b.tobytes()
    other = generate(pipe, ["a large yellow star in the center on a green background"], 3)[0]
    assert detect(a).background == "purple" and detect(other).background == "green"


def test_controlnet_acts_and_its_images_keep_the_control_edges(pipe):
    from inference.controlnet import load_controlnet
    controlnet = load_controlnet(pipe, os.path.join(ROOT, CONTROLNET))
    prompts = ["a large red circle in the top left on a white background",
               "a medium blue square at the bottom on a yellow background"]
    with_cn, without = [], []
    for i, prompt in enumerate(prompts):
        render = Scene(**parse_caption(prompt), variant=i).render(128)
        control = torch.from_numpy(np.asarray(render, np.float32) / 255).permute(2, 0, 1)[None]
        image = generate(pipe, [prompt], i, controlnet=controlnet, control_image=control)[0]
        plain = generate(pipe, [prompt], i)[0]
        assert image.tobytes() != plain.tobytes()  # the residuals reach Stage C
        with_cn.append(dilated_iou(canny_edges(image), canny_edges(render)))
        without.append(dilated_iou(canny_edges(plain), canny_edges(render)))
        assert detect(image).background == detect(render).background
    assert np.mean(with_cn) > 0.3, (with_cn, without)


def test_lora_draws_the_new_token_and_leaves_other_prompts_as_they_were(pipe):
    base_prompt = ["a large green heart on the right on a black background"]
    before = np.asarray(generate(pipe, base_prompt, 5)[0], np.float64)
    zorb_prompts = [f"a large {c} [zorb] in the center on a {b} background"
                    for c, b in (("red", "white"), ("blue", "yellow"), ("white", "purple"))]
    lora = pipe.load_lora(os.path.join(ROOT, LORA))
    try:
        zorbs = generate(pipe, zorb_prompts, 0)
        after = np.asarray(generate(pipe, base_prompt, 5)[0], np.float64)
    finally:
        lora.remove()
    assert sum(detect(im).shape == ZORB for im in zorbs) >= 2
    assert np.array_equal(after, before)  # token-gated: a prompt without '[zorb]' never meets the LoRA
    assert np.array_equal(np.asarray(generate(pipe, base_prompt, 5)[0], np.float64), before)  # removed cleanly


def test_model_card_is_what_the_recorded_build_and_evaluation_give():
    """models/demo/README.md is written by demo.model_card from build_log.json and eval.json: regenerating it
    from the shipped files gives the same text, so its figures are the measured ones."""
    from demo.model_card import card
    with open(os.path.join(DEMO, "README.md"), encoding="utf-8") as f:
        assert f.read() == card()
