"""demo.evaluate_model's ControlNet and LoRA scores, on stand-in pipelines whose outputs are known: renders of the
prompts (a perfect model), other renders, or a LoRA that draws the zorb. The real model's numbers come from the
same functions (models/demo/eval.json)."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import demo.evaluate_model as evaluate_model
from demo.evaluate import canny_edges, dilated_iou
from demo.make_dataset import SPLIT_SEEDS
from demo.scenes import ZORB, Scene, parse_caption, prompt_records, sample_heldout_scenes, sample_zorb_scenes


def render(prompt, seed, **changes):
    attributes = {**parse_caption(prompt), **changes}
    return Scene(**attributes, variant=seed).render(evaluate_model.SIZE)


class StandIn:
    """pipe.generate(prompts, seed=s) → renders (image i from seed s + i); `draw` picks what each prompt becomes."""

    def __init__(self, draw):
        self.draw, self.calls = draw, []

    def generate(self, prompts, seed, **kwargs):
        self.calls.append(kwargs)
        images = [self.draw(p, seed + i, kwargs) for i, p in enumerate(prompts)]
        return SimpleNamespace(pil=lambda: images)


@pytest.fixture
def records():
    return prompt_records(sample_heldout_scenes(6, [0, SPLIT_SEEDS["heldout"]]))


def test_controlnet_score_and_its_references(records, monkeypatch):
    monkeypatch.setattr("inference.controlnet.load_controlnet", lambda pipe, path: "canny")
    perfect = StandIn(lambda p, s, kw: render(p, s))
    blank = [Image.new("RGB", (128, 128), (128, 128, 128))] * len(records)
    exact = [render(r["prompt"], r["seed"]) for r in records] + blank  # longer lists: the first n count
    result = evaluate_model.controlnet_iou(perfect, records, without=blank, reconstructed=exact, batch_size=4)
    assert result["edge_iou_mean"] == 1.0 and result["n"] == len(records)
    assert result["edge_iou_without_controlnet"] == 0.0 and result["edge_iou_ab_reconstruction"] == 1.0
    # each call got its own scene's render as the control, and the loaded ControlNet
    assert len(perfect.calls) == len(records) and all(c["controlnet"] == "canny" for c in perfect.calls)
    for call, r in zip(perfect.calls, records):
        control = (call["control_image"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(control, np.asarray(render(r["prompt"], r["seed"])))
    # a generator that draws the shape elsewhere scores what the edge maps say
    moved = StandIn(lambda p, s, kw: render(p, s, position="center" if parse_caption(p)["position"] != "center"
                                            else "top left"))
    result = evaluate_model.controlnet_iou(moved, records, without=blank, reconstructed=blank)
    expected = np.mean([dilated_iou(canny_edges(render(r["prompt"], r["seed"], position="center"
                                                       if r["attributes"]["position"] != "center" else "top left")),
                                    canny_edges(render(r["prompt"], r["seed"]))) for r in records])
    assert result["edge_iou_mean"] == pytest.approx(expected) and expected < 0.5


def test_lora_effect_counts_tokens_and_changes_of_base_prompts(records):
    zorbs = prompt_records(sample_zorb_scenes(4, [0, SPLIT_SEEDS["zorb_prompts"]]))
    state = {"loaded": False}

    def draw(prompt, seed, kwargs):
        attributes = parse_caption(prompt)
        if attributes["shape"] == ZORB and not state["loaded"]:
            attributes["shape"] = "circle"  # without the LoRA the token means nothing
        if state["loaded"] and seed == records[0]["seed"] and attributes["shape"] != ZORB:
            attributes["size"] = "small" if attributes["size"] != "small" else "large"  # one base image changes size
        return Scene(**attributes, variant=seed).render(evaluate_model.SIZE)

    pipe = StandIn(draw)

    def load_lora(path):
        state["loaded"] = True
        return SimpleNamespace(remove=lambda: state.update(loaded=False))
    pipe.load_lora = load_lora
    result = evaluate_model.lora_effect(pipe, zorbs, records)
    assert result["token_accuracy"]["accuracy"] == 1.0 and result["token_accuracy_without_lora"]["accuracy"] == 0.0
    n = len(records)
    assert result["base_prompts_same_detection"]["correct"] == n - 1  # the size flip counts here ...
    assert result["base_prompts_same_shape_colour_position_background"]["correct"] == n  # ... not here
    assert result["base_prompts_mean_abs_pixel_change"] > 0 and not state["loaded"]
    assert result["base_accuracy_without_lora"]["shape"]["accuracy"] == 1.0
