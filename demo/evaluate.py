"""Scores for the demo model: attribute accuracy on held-out prompts (with 95% Wilson intervals and chance
levels), PSNR for Stage A/B reconstructions, dilated-edge IoU for ControlNet edge agreement, and how often a
LoRA's new token draws the zorb.

    python -m demo.evaluate [--prompts heldout_prompts.json] [--n 300] [--image-size 256]

The command scores the detector itself: it "generates" each prompt by rendering the scene the prompt
describes, so the table shows how far the detector can be trusted.
"""
import argparse
import json
import math

import cv2
import numpy as np
import PIL.Image

from .detector import detect
from .scenes import (COLOURS, POSITIONS, SHAPES, SIZES, ZORB, Scene, parse_caption, prompt_records,
                     sample_heldout_scenes, sample_zorb_scenes)

Z95 = 1.959963984540054  # standard normal 97.5% quantile
# attribute → its possible values; chance accuracy is 1 / their number
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": POSITIONS,
              "background": tuple(COLOURS)}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple:
    """Wilson score interval for a binomial proportion (Wilson 1927; see Brown, Cai & DasGupta 2001)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict:
    return {"correct": successes, "n": n, "accuracy": successes / n, "ci95": wilson_interval(successes, n)}


def score(detections, expected) -> dict:
    """Per attribute, and for all five at once: correct count, accuracy, 95% interval and chance level (for all
    five: the product of the attributes' chance levels)."""
    detections, expected = list(detections), list(expected)
    result = {}
    for name, values in ATTRIBUTES.items():
        correct = sum(d.attributes()[name] == e[name] for d, e in zip(detections, expected, strict=True))
        result[name] = {**proportion(correct, len(expected)), "chance": 1 / len(values)}
    every = sum(all(d.attributes()[name] == e[name] for name in ATTRIBUTES)
                for d, e in zip(detections, expected, strict=True))
    result["all"] = {**proportion(every, len(expected)), "chance": math.prod(1 / len(v) for v in ATTRIBUTES.values())}
    return result


def evaluate_generator(generate, prompts, batch_size: int = 16) -> dict:
    """Score `generate(prompts, seeds) -> [PIL image]` on prompt records ({'prompt', 'seed', 'attributes'},
    e.g. `load_prompts` of make_dataset's held-out file; n ≥ 300 keeps the 95% intervals within about ±6%)."""
    detections = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        images = generate([r["prompt"] for r in batch], [r["seed"] for r in batch])
        if len(images) != len(batch):
            raise ValueError(f"generate returned {len(images)} images for {len(batch)} prompts")
        detections.extend(detect(image) for image in images)
    return score(detections, [r["attributes"] for r in prompts])


def markdown_table(result: dict) -> str:
    lines = ["| attribute | accuracy | 95% CI | chance | n |", "|---|---|---|---|---|"]
    for name, row in result.items():
        low, high = row["ci95"]
        lines.append(f"| {name} | {row['accuracy']:.3f} | [{low:.3f}, {high:.3f}] | {row['chance']:.3g} | {row['n']} |")
    return "\n".join(lines)


def load_prompts(path: str) -> list:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.float64)


def psnr(a, b, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (PIL, or arrays on a 0..max_value scale); inf if equal."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(max_value ** 2 / mse)


def canny_edges(image, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean edge map of a PIL image: cv2.Canny on its three colour channels, as `CannyFilter` makes the
    ControlNet's input. Grey levels would lose the outline of colour pairs of equal brightness (yellow on white:
    18% of held-out scenes had no edges at all), so the score would count controls the ControlNet never saw."""
    return cv2.Canny(np.asarray(image.convert("RGB")), low, high) > 0


def dilated_iou(a: np.ndarray, b: np.ndarray, radius: int = 2) -> float:
    """IoU of two edge maps after dilating each by a disc of `radius` pixels, so that edges a few pixels apart
    still count as agreeing; 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"edge maps differ in shape: {a.shape} vs {b.shape}")
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    a, b = (cv2.dilate(np.asarray(m).astype(np.uint8), disc).astype(bool) for m in (a, b))
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def edge_iou(generated, control_edges: np.ndarray, radius: int = 2) -> float:
    """ControlNet edge agreement: Canny edges of the generated image against the control's edge map."""
    return dilated_iou(canny_edges(generated), control_edges, radius)


def lora_token_accuracy(images) -> dict:
    """How often the detector sees the zorb in images generated from '[zorb]' prompts."""
    images = list(images)
    return proportion(sum(detect(image).shape == ZORB for image in images), len(images))


def render_prompts(prompts, seeds, image_size: int = 256) -> list:
    """A perfect generator: the scene each prompt describes, laid out and textured by its seed."""
    return [Scene(**parse_caption(p), variant=seed).render(image_size) for p, seed in zip(prompts, seeds)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", help="held-out prompt file of demo.make_dataset (default: sample --n)")
    parser.add_argument("--n", type=int, default=300, help="held-out prompts to sample when --prompts is not given")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--image-size", type=int, default=256, help="side of the rendered images")
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts) if args.prompts else prompt_records(sample_heldout_scenes(args.n, args.seed))

    def generate(texts, seeds):
        return render_prompts(texts, seeds, args.image_size)

    print(f"detector on ground-truth renders of {len(prompts)} held-out prompts at {args.image_size} px")
    print(markdown_table(evaluate_generator(generate, prompts)))
    zorbs = prompt_records(sample_zorb_scenes(len(prompts), args.seed))
    token = lora_token_accuracy(generate([r["prompt"] for r in zorbs], [r["seed"] for r in zorbs]))
    low, high = token["ci95"]
    print(f"\nzorb seen in {token['correct']}/{token['n']} zorb renders ({token['accuracy']:.3f}, "
          f"95% CI [{low:.3f}, {high:.3f}])")


if __name__ == "__main__":
    main()
