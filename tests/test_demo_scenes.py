"""demo/: procedural scenes, the held-out rule, captions, the attribute detector, evaluation scores and the
dataset writer read back through core/data."""
import io
import json
import math
import tarfile
from collections import Counter

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
import torchvision.transforms.functional as TF

from core.data import build_dataloader
from demo import evaluate
from demo.detector import Detection, detect
from demo.make_dataset import SPLIT_SEEDS, main as make_dataset_main
from demo.scenes import (COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, TEMPLATES, TRAIN_TRIPLES, ZORB, ZORB_TOKEN,
                         Scene, background_image, is_held_out, parse_caption, prompt_records, sample_heldout_scenes,
                         sample_train_scenes, sample_zorb_scenes, triples)


def test_scenes_and_images_are_a_function_of_the_seed():
    first, again, other = sample_train_scenes(12, 5), sample_train_scenes(12, 5), sample_train_scenes(12, 6)
    assert first == again and first != other
    for a, b in zip(first, again):
        assert a.render(128).tobytes() == b.render(128).tobytes() and a.caption() == b.caption()
    scene = first[0]
    assert scene.render().size == (256, 256) and scene.render(128).size == (128, 128)
    # another variant moves and re-textures the same attributes
    moved = Scene(**scene.attributes(), variant=scene.variant + 1)
    assert moved.render(128).tobytes() != scene.render(128).tobytes()
    # both resolutions draw the same picture
    small, large = np.asarray(scene.render(128), float), np.asarray(scene.render(256).resize((128, 128)), float)
    assert np.abs(small - large).mean() < 3
    with pytest.raises(ValueError, match="invisible"):
        Scene("circle", "red", "small", "top", "red")
    with pytest.raises(ValueError, match="shape"):
        Scene("blob", "red", "small", "top", "blue")


def test_rendering_is_anti_aliased_and_shows_the_colours():
    image = np.asarray(Scene("circle", "red", "large", "center", "blue", variant=0).render(128)).reshape(-1, 3)
    colours = {tuple(c) for c in image}
    assert tuple(COLOURS["red"]) in colours
    # blended rim pixels lie between the two colours: more than pure shape and (possibly textured) background
    red, blue = np.array(COLOURS["red"]), np.array(COLOURS["blue"])
    t = (image - blue) @ (red - blue) / ((red - blue) @ (red - blue))
    assert ((t > 0.2) & (t < 0.8)).sum() > 50


def test_held_out_rule_covers_a_quarter_and_training_never_samples_it():
    every = triples()
    assert len(every) == 8 * 8 * 7 and len(HELD_OUT) == math.ceil(0.25 * len(every))
    assert len(HELD_OUT) / len(every) >= 0.2 and set(TRAIN_TRIPLES) | HELD_OUT == set(every)
    train = sample_train_scenes(3000, 0)
    assert not any(is_held_out(s.shape, s.colour, s.background) for s in train)
    assert len({(s.shape, s.colour, s.background) for s in train}) == len(TRAIN_TRIPLES)  # all used
    held = sample_heldout_scenes(300, 0)
    assert all(is_held_out(s.shape, s.colour, s.background) for s in held)
    # held-out triples are new combinations of pairs that training shows
    pairs = {(i, t[i], t[j]) for t in TRAIN_TRIPLES for i, j in ((0, 1), (0, 2), (1, 2))}
    assert all((i, t[i], t[j]) in pairs for t in HELD_OUT for i, j in ((0, 1), (0, 2), (1, 2)))
    zorbs = sample_zorb_scenes(50, 0)
    assert all(s.shape == ZORB for s in zorbs) and ZORB not in {s.shape for s in train + held}
    assert all(ZORB_TOKEN in s.caption() and ZORB not in s.caption().replace(ZORB_TOKEN, "") for s in zorbs)


def test_captions_name_every_attribute_and_parse_back():
    scenes = sample_train_scenes(150, 1) + sample_heldout_scenes(50, 1) + sample_zorb_scenes(20, 1)
    for scene in scenes:
        captions = {scene.caption(t) for t in range(len(TEMPLATES))}
        assert len(captions) == len(TEMPLATES)
        for caption in captions:
            assert parse_caption(caption) == scene.attributes(), caption
            assert f"{scene.background} background" in caption
    assert Counter(s.caption() == s.caption(0) for s in scenes)[True] < len(scenes)  # templates vary
    assert Scene("star", "orange", "small", "top left", "blue").caption(2) == \
        "blue background with an orange star, top-left, small"
    assert Scene("star", "red", "small", "top left", "blue").caption(0) == \
        "a small red star in the top left on a blue background"
    assert Scene(ZORB, "red", "small", "top left", "blue").caption(0) == \
        "a small red [zorb] in the top left on a blue background"
    with pytest.raises(ValueError, match="shape"):
        parse_caption("a small red thing in the top left on a blue background")
    with pytest.raises(ValueError, match="position"):
        parse_caption("a small red star at the top, bottom left, on a blue background")
    with pytest.raises(ValueError, match="colour"):
        parse_caption("a small red star at the top on a blue background, and green")


def _wrong(scenes, size):
    wrong = Counter()
    for scene in scenes:
        found = detect(scene.render(size)).attributes()
        wrong.update(k for k, v in scene.attributes().items() if found[k] != v)
    return wrong


@pytest.mark.parametrize("size", [128, 256])
def test_detector_reads_ground_truth_renders(size):
    scenes = sample_train_scenes(160, size) + sample_heldout_scenes(160, size)
    wrong = _wrong(scenes, size)
    assert all(wrong[k] <= 0.02 * len(scenes) for k in scenes[0].attributes()), wrong
    # every value of every attribute was tried
    assert {s.shape for s in scenes} == set(SHAPES) and {s.position for s in scenes} == set(POSITIONS)
    assert {s.size for s in scenes} == set(SIZES) and {s.background for s in scenes} == set(COLOURS)


def test_detector_tolerates_jpeg_and_blur():
    """A generator's images are softer than renders: JPEG q75 or a 1.5 px Gaussian blur at 128 px."""
    def jpeg(image):
        stream = io.BytesIO()
        image.save(stream, format="JPEG", quality=75)
        return PIL.Image.open(stream).convert("RGB")

    scenes = sample_heldout_scenes(150, 11)
    for degrade in (jpeg, lambda image: image.filter(PIL.ImageFilter.GaussianBlur(1.5))):
        wrong = Counter()
        for scene in scenes:
            found = detect(degrade(scene.render(128))).attributes()
            wrong.update(k for k, v in scene.attributes().items() if found[k] != v)
        assert all(wrong[k] <= 0.03 * len(scenes) for k in scenes[0].attributes()), wrong


def test_detector_without_a_shape_names_only_the_background():
    for seed in range(12):  # plain, gradient and noise textures among them
        pixels = background_image("red", 128, np.random.default_rng(seed))
        found = detect(PIL.Image.fromarray(pixels.round().astype(np.uint8)))
        assert found == Detection(None, None, None, None, "red")
    # speckles: far from the background, but no solid region once the blend is undone
    pixels = np.tile(np.array(COLOURS["red"], np.uint8), (128, 128, 1))
    pixels[40:80, 40:80] += np.array([0, 0, 60], np.uint8)
    pixels[40:80:2, 40:80:2] = COLOURS["white"]
    assert detect(PIL.Image.fromarray(pixels)) == Detection(None, None, None, None, "red")


def test_wilson_interval_against_known_values():
    low, high = evaluate.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        evaluate.wilson_interval(3, 0)


def test_psnr_and_dilated_edge_iou_against_closed_forms():
    a = np.zeros((16, 16, 3), np.uint8)
    assert evaluate.psnr(a, a + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert evaluate.psnr(a, a) == math.inf
    # full-height vertical lines d columns apart, dilated by radius r: bands of width 2r+1, IoU (2r+1-d)/(2r+1+d)
    r = 2
    for d in range(8):
        x, y = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
        x[:, 10], y[:, 10 + d] = True, True
        expected = max(0, 2 * r + 1 - d) / (2 * r + 1 + min(d, 2 * r + 1))
        assert evaluate.dilated_iou(x, y, r) == pytest.approx(expected)
    assert evaluate.dilated_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    image = Scene("square", "white", "large", "center", "black", variant=0).render(128)
    edges = evaluate.canny_edges(image)
    assert edges.sum() > 100 and evaluate.edge_iou(image, edges) == 1.0
    # moved right by d px: agreement falls with d, and the horizontal edges still overlap
    ious = [evaluate.edge_iou(image.transform(image.size, PIL.Image.Transform.AFFINE, (1, 0, -d, 0, 1, 0),
                                              fillcolor=COLOURS["black"]), edges) for d in (1, 3, 6)]
    assert 1 > ious[0] > ious[1] > ious[2] > 0.1


def test_edge_maps_are_the_controlnets_own_input():
    """The ControlNet score compares against the edges CannyFilter gave the ControlNet: colour Canny, which sees a
    red diamond on green (nearly equal grey levels: grey Canny finds no edge there at all)."""
    from modules.controlnet_filters import CannyFilter
    for scene in (Scene("diamond", "red", "large", "right", "green", variant=48),
                  Scene("circle", "blue", "small", "top left", "green", variant=5)):
        image = scene.render(128)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
        control = CannyFilter(resize=None)(pixels)[0, 0].numpy() > 0
        edges = evaluate.canny_edges(image)
        assert edges.sum() > 50 and np.array_equal(edges, control)


def test_evaluate_generator_scores_oracle_and_constant_generators():
    prompts = prompt_records(sample_heldout_scenes(60, 7))
    perfect = evaluate.evaluate_generator(lambda p, s: evaluate.render_prompts(p, s, 128), prompts, batch_size=25)
    assert all(row["accuracy"] >= 0.95 and row["n"] == 60 for row in perfect.values())
    assert perfect["shape"]["chance"] == 1 / 8 and perfect["position"]["chance"] == 1 / 9
    fixed = Scene("heart", "blue", "medium", "left", "yellow", variant=1)
    constant = evaluate.evaluate_generator(lambda p, s: [fixed.render(128)] * len(p), prompts)
    for name, row in constant.items():
        if name != "all":
            correct = sum(r["attributes"][name] == getattr(fixed, name) for r in prompts)
            assert row["correct"] == correct and row["ci95"] == evaluate.wilson_interval(correct, 60)
    table = evaluate.markdown_table(constant)
    assert table.count("\n") == 2 + 5 and "| shape |" in table and "| all |" in table
    assert evaluate.lora_token_accuracy([s.render(128) for s in sample_zorb_scenes(30, 0)])["accuracy"] >= 0.95
    assert evaluate.lora_token_accuracy([s.render(128) for s in sample_train_scenes(30, 0)])["correct"] == 0


def test_evaluate_cli_prints_the_detector_table(capsys):
    evaluate.main(["--n", "20", "--image-size", "128"])
    out = capsys.readouterr().out
    assert "| background |" in out and "zorb seen in" in out


def test_make_dataset_shards_read_back_through_core_data(tmp_path):
    args = ["--num-train", "7", "--num-heldout", "300", "--num-zorb", "3", "--seed", "4", "--image-size", "64",
            "--maxcount", "3"]
    make_dataset_main([str(tmp_path / "a")] + args)
    make_dataset_main([str(tmp_path / "b")] + args)
    shards = sorted((tmp_path / "a" / "train").glob("*.tar"))
    assert len(shards) == 3
    for shard in shards + sorted((tmp_path / "a" / "zorb").glob("*.tar")):  # same seed, same bytes
        assert shard.read_bytes() == (tmp_path / "b" / shard.parent.name / shard.name).read_bytes()
    scenes = sample_train_scenes(7, [4, SPLIT_SEEDS["train"]])
    loader = build_dataloader(str(tmp_path / "a" / "train"), 1, image_size=64, crop="center", shuffle_buffer=0,
                              drop_last=False, num_workers=0)
    batches = list(loader.iter_epoch())
    assert len(batches) == 7
    for batch in batches:
        scene = scenes[int(batch["keys"][0])]
        assert batch["captions"] == [scene.caption()]
        assert torch.equal(batch["images"][0], TF.to_tensor(scene.render(64)))
    with tarfile.open(shards[0]) as tar:
        assert json.loads(tar.extractfile("000000001.json").read()) == {
            **scenes[1].attributes(), "variant": scenes[1].variant, "width": 64, "height": 64}
    prompts = evaluate.load_prompts(tmp_path / "a" / "heldout_prompts.json")
    assert len(prompts) == 300 and [r["seed"] for r in prompts] == list(range(300))
    for record in prompts:
        assert is_held_out(*(record["attributes"][k] for k in ("shape", "colour", "background")))
        assert parse_caption(record["prompt"]) == record["attributes"]
    zorb_prompts = evaluate.load_prompts(tmp_path / "a" / "zorb_prompts.json")
    assert all(ZORB_TOKEN in r["prompt"] and r["attributes"]["shape"] == ZORB for r in zorb_prompts)
