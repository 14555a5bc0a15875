"""ControlNets at inference: a ControlNet and its filter, read from upstream's ControlNet configs, whose residuals the
pipeline adds to Stage C in both CFG branches.

    python -m inference.generate --config configs/inference/big-big.yaml --controlnet canny --control-image in.png

The configs are upstream's (configs/inference/controlnet_c_3b_{canny,inpainting,sr,identity}.yaml), read with the
ControlNet trainer's own config and built by its `build_controlnet`, so training and inference agree on every key.
"""
import os

import torch
import torch.nn.functional as F

from inference.pipeline import PipelineError
from modules.controlnet_filters import InpaintFilter, build_filter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("canny", "inpainting", "sr", "identity")
# Stage C preset -> infix of its ControlNet configs; ControlNets were released for the 3.6B Stage C only
_CONFIG_INFIX = {"3.6B": "c_3b", "tiny": "tiny", "demo": "demo"}


def controlnet_config_path(source, stage_c_preset):
    """`source` is a config path, or a name (canny, inpainting, sr, identity) whose config fits the Stage C."""
    if source.endswith((".yaml", ".yml")):
        return source
    if source not in NAMES:
        raise PipelineError(f"unknown ControlNet {source!r}: use one of {', '.join(NAMES)} or a config .yaml")
    infix = _CONFIG_INFIX.get(stage_c_preset)
    if infix is None:
        raise PipelineError(f"no ControlNet config for the {stage_c_preset} Stage C (ControlNets were released for "
                            "the 3.6B one); train one with train/train_c_controlnet.py and pass its config's path")
    return os.path.join(ROOT, "configs", "inference", f"controlnet_{infix}_{source}.yaml")


def controlnet_sampling(pipeline_config, source) -> dict:
    """The `sampling` of the ControlNet config `source` names for a pipeline config's Stage C, read without loading
    any weights (what the app's sliders show on a ControlNet tab); {} when there is no such config or it sets none."""
    from inference.config import PipelineConfig, load_pipeline_config
    cfg = pipeline_config if isinstance(pipeline_config, PipelineConfig) else load_pipeline_config(pipeline_config)
    try:
        path = controlnet_config_path(source, cfg.stage_c.model_version)
    except PipelineError:
        return {}
    if not os.path.isfile(path):
        return {}
    return _read_config(path).sampling or {}


def _read_config(path):
    """A ControlNet config for inference, its `sampling` checked like a pipeline config's."""
    from inference.config import check_sampling
    from train.train_c_controlnet import ControlNetCore
    cfg = ControlNetCore.Config.load(path, training=False)
    check_sampling(cfg.sampling, path)
    return cfg


def load_mask(path):
    """A mask image file as 1×1×H×W bool: white (> 50% grey) marks the pixels to fill."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise ValueError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read mask {path}: {e}") from None
    return torch.from_numpy(grey)[None, None] > 0.5


class LoadedControlNet:
    """A ControlNet with its filter. `output_scale`: the output is this many times the control image's size (2 for
    super resolution, else 1)."""

    def __init__(self, name, model, control_filter, checkpoint_path=None, sampling=None):
        self.name, self.model, self.filter, self.checkpoint_path = name, model, control_filter, checkpoint_path
        self.sampling = sampling or {}  # its config's `sampling`: {stage_c/stage_b: {steps, cfg, shift}}
        self.output_scale = getattr(control_filter, "output_scale", 1)

    def check_size(self, image, height, width):
        """With output_scale != 1 the output size is fixed by the control image; anything else is an error."""
        expected = tuple(round(s * self.output_scale / 32) * 32 for s in image.shape[-2:])  # the pipeline's sizes
        if self.output_scale != 1 and (height, width) != expected:
            h, w = image.shape[-2:]
            raise PipelineError(f"the {self.name} ControlNet makes {self.output_scale}× the control image ({h}×{w}): "
                                f"pass height={expected[0]}, width={expected[1]}")

    def residuals(self, pipe, image, shape_c, mask=None, outpaint=False, strength=1.0):
        """(Stage C's `cnet` list for the batch, B×3×h×w picture of the control input).

        The filter sees the control image at the EfficientNet's stride × Stage C's latent size, as in training
        (768² for 24² latents; the demo's 128² for 8²); a super-resolution filter gets it at 1/output_scale of
        that (antialiased), upsampled by nearest neighbour, which its own nearest downscale undoes exactly. The
        residuals are scaled by `strength`.
        """
        n, batch = image.shape[0], shape_c[0]
        if batch % n:
            raise PipelineError(f"{n} control images do not divide a batch of {batch} images")
        size = (shape_c[2] * pipe.effnet_stride, shape_c[3] * pipe.effnet_stride)
        s = self.output_scale
        x = F.interpolate(image.float(), size=(size[0] // s, size[1] // s), mode="bilinear", antialias=True)
        x = F.interpolate(x, size=size, mode="nearest").clamp(0, 1).to(pipe.device)
        kwargs = {}
        if isinstance(self.filter, InpaintFilter):
            if mask is not None:
                while mask.dim() < 4:  # H×W or 1×H×W
                    mask = mask[None]
                mask = F.interpolate(mask.float(), size=size, mode="nearest").to(pipe.device) > 0.5
            elif self.filter.mask_source != "saliency":
                raise PipelineError("inpainting needs a mask, or the saliency weights for an automatic one "
                                    "(`bash models/download_models.sh controlnet saliency`)")
            # no random choices at inference: the saliency map cut at upstream's notebook threshold, 0.2
            kwargs = {"mask": mask, "outpaint": bool(outpaint), "threshold": 0.2}
        elif mask is not None or outpaint:
            raise PipelineError(f"a mask and outpainting are for the inpainting ControlNet, not {self.name}")
        control = self.filter(x, **kwargs)
        with pipe._on_device(self.model) as model:
            cnet = model(control.to(pipe.device, pipe.dtype))
        cnet = [None if r is None else (r * strength).repeat_interleave(batch // n, 0) for r in cnet]
        return cnet, self.filter.preview(x, control).float().cpu().repeat_interleave(batch // n, 0)

    def describe(self):
        return {"controlnet": self.name, "controlnet_checkpoint": self.checkpoint_path}


def load_controlnet(pipe, source):
    """The ControlNet `source` names (see `controlnet_config_path`), fitted to the pipeline's Stage C: its filter
    shares the pipeline's EfficientNet encoder. Without a checkpoint only the tiny configs run, with random weights."""
    from train.train_c_controlnet import build_controlnet
    preset = (getattr(pipe.stage_c, "build_spec", None) or {}).get("preset")
    path = controlnet_config_path(source, preset)
    if not os.path.isfile(path):
        raise PipelineError(f"ControlNet config not found: {path}")
    cfg = _read_config(path)
    version = "3.6B" if cfg.model_version == "3B" else cfg.model_version
    if preset is not None and version != preset:
        raise PipelineError(f"{path} is a ControlNet for the {version} Stage C, but the pipeline's is {preset}")
    checkpoint = cfg.controlnet_checkpoint_path
    name = source if source in NAMES else os.path.splitext(os.path.basename(path))[0]
    if checkpoint and not os.path.isfile(checkpoint):
        released = os.path.splitext(os.path.basename(checkpoint))[0]
        raise PipelineError(f"ControlNet weights not found at {checkpoint}; download them with "
                            f"`bash models/download_models.sh controlnet {released}`")
    if not checkpoint and version != "tiny":
        raise PipelineError(f"{path} names no controlnet_checkpoint_path (the {name} ControlNet was never released): "
                            f"train one with train/train_c_controlnet.py and set the path")
    if checkpoint:
        from core.weights import objective_mismatch
        mismatch = objective_mismatch(checkpoint, getattr(pipe.stage_c, "gdf_target", "epsilon"), "it")
        if mismatch:
            raise PipelineError(mismatch)
    control_filter = build_filter(cfg.controlnet_filter, pipe.device, cfg.controlnet_filter_params,
                                  effnet=pipe.effnet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_controlnet(cfg, pipe.stage_c, control_filter, dtype=pipe.dtype)
        if not checkpoint:
            from inference.loading import _break_zero_init
            _break_zero_init(model)  # a fresh ControlNet is a no-op; a random one shows its effect
    model.eval().requires_grad_(False).to("cpu" if pipe.offload else pipe.device)
    return LoadedControlNet(name, model, control_filter, checkpoint, cfg.sampling)
