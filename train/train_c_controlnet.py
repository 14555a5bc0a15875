"""ControlNet training on a frozen Stage C:
`python train/train_c_controlnet.py configs/training/controlnet_c_3b_canny.yaml [key=value ...]`.

A filter (modules.controlnet_filters) turns each training image into the control input; the ControlNet turns that
into residuals for the listed ResBlocks of Stage C, which keeps its Stage C conditions and loss (`WurstCoreC`).
Only the ControlNet learns and only it is saved. Stage C is frozen and in eval mode (upstream leaves it in train
mode, dropout on); the ControlNet's backbone stays in eval mode, its BatchNorm statistics frozen, while its
weights train (SPEC §5).
"""
import dataclasses
import os
import sys
from typing import Any, Literal, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from core import distributed  # noqa: E402
from core.config import EXPECTED, ConfigError  # noqa: E402
from core.warpcore import WarpCore  # noqa: E402
from modules.controlnet_filters import BaseFilter, build_filter  # noqa: E402
from modules.presets import build_model  # noqa: E402
from train.base import main  # noqa: E402
from train.train_c import WurstCoreC  # noqa: E402


def control_blocks(stage_c):
    """Stage C's blocks that take a ControlNet residual (its ResBlocks), in execution order."""
    return [m for m in stage_c.modules() if getattr(m, "receives_control", False)]


def build_controlnet(config, stage_c, control_filter, dtype=None, device="cpu"):
    """The ControlNet that upstream's keys in `config` describe, fitted to `stage_c` and `control_filter`.

    c_in is the filter's channel count and c_proj the width of Stage C's ResBlocks (upstream hard-codes 2048,
    which fits the 3.6B model only; the 1B one needs 1536). Loaded from `controlnet_checkpoint_path`, else freshly
    initialised: a no-op until trained, its last projections being zero.
    """
    blocks = control_blocks(stage_c)
    wanted = list(config.controlnet_blocks)
    if not wanted or min(wanted) < 0 or max(wanted) >= len(blocks):
        raise ConfigError(f"controlnet_blocks {wanted} must lie in 0..{len(blocks) - 1} (this Stage C has "
                          f"{len(blocks)} ResBlocks)")
    widths = sorted({blocks[i].depthwise.in_channels for i in wanted})
    if len(widths) != 1:  # e.g. a Stage C whose levels differ in width (the demo's): pick blocks of one level
        raise ConfigError(f"controlnet_blocks {wanted} are ResBlocks of widths {widths}; one ControlNet projection "
                          f"width cannot feed them: choose blocks of one width")
    kwargs = dict(c_in=control_filter.num_channels(), c_proj=widths[0], proj_blocks=wanted,
                  bottleneck_mode=config.controlnet_bottleneck_mode)
    if config.controlnet_checkpoint_path:
        from core.weights import load_model
        return load_model(config.controlnet_checkpoint_path, kind="controlnet", kwargs=kwargs, dtype=dtype,
                          device=device)
    return build_model("controlnet", None, dtype=dtype, **kwargs).to(device)


@torch.no_grad()
def init_backbone_from_encoder(controlnet, effnet):
    """Starts an 'effnet' ControlNet backbone from the EfficientNet encoder's (same EfficientNetV2-S features).

    Upstream starts it from torchvision's ImageNet weights, which no machine here can download; a random backbone
    in eval mode is no substitute: with untouched BatchNorm statistics its features shrink to ~1e-8 (no signal,
    and denormal numbers that slow a CPU down a hundredfold). The encoder's backbone began as those ImageNet
    weights. A stem for c_in != 3 channels keeps its own rule: the first min(c_in, 3) input channels, zeros after.
    """
    source = effnet.backbone.state_dict()
    target = controlnet.backbone.state_dict()
    for name, value in source.items():
        if target[name].shape == value.shape:
            target[name].copy_(value)
        else:  # the stem conv of a ControlNet whose input is not RGB
            n = min(value.shape[1], target[name].shape[1])
            target[name].zero_()[:, :n] = value[:, :n]


class ControlNetCore(WurstCoreC):
    """Trains a ControlNet for Stage C (upstream's notebook name: `from train import ControlNetCore`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(WurstCoreC.Config):
        RENAMED = {"controlnet_filter_params.thresold": "controlnet_filter_params.threshold"}  # upstream's typo
        controlnet_blocks: list[int] = EXPECTED  # Stage C ResBlocks (execution order) that receive residuals
        controlnet_filter: str = EXPECTED  # a modules.controlnet_filters class, e.g. CannyFilter
        controlnet_filter_params: Optional[dict] = None  # the filter's keyword arguments
        # None: effnet
        controlnet_bottleneck_mode: Optional[Literal["effnet", "simple", "large", "conv", "conv16"]] = None
        controlnet_checkpoint_path: Optional[str] = None  # ControlNet weights to start from
        offset_noise: Optional[float] = None  # per-channel offset noise (upstream: 0.1 for inpainting and SR)
        # inference only: sampling settings (like a pipeline config's `sampling`) used with this ControlNet unless
        # the user gives others, over the pipeline's; e.g. a lower Stage C CFG, which amplifies the prompt, not
        # the control (its residuals enter both branches)
        sampling: Optional[dict] = None

    @dataclasses.dataclass
    class Models(WurstCoreC.Models):
        controlnet: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):  # the ControlNet's only: Stage C has none
        controlnet: Any = None

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        controlnet: Any = None

    @dataclasses.dataclass
    class Extras(WurstCoreC.Extras):
        controlnet_filter: BaseFilter = None

    FROZEN_GENERATOR_FOR = "a ControlNet"

    def trained_models(self):
        return ["controlnet"]

    def setup_extras_pre(self):
        extras = super().setup_extras_pre()
        extras.gdf.offset_noise = self.config.offset_noise or 0.0
        return extras

    def setup_models(self, extras):
        """Stage C's models, then the filter (sharing the EfficientNet encoder, which SREffnetFilter needs; it goes
        into `extras.controlnet_filter`, as upstream's notebooks expect) and the ControlNet."""
        models = super().setup_models(extras)
        cfg = self.config
        extras.controlnet_filter = build_filter(cfg.controlnet_filter, self.device, cfg.controlnet_filter_params,
                                                effnet=models.effnet)
        controlnet = build_controlnet(cfg, models.generator, extras.controlnet_filter, self.dtype(), self.device)
        fresh = cfg.training and cfg.controlnet_checkpoint_path is None
        if fresh and cfg.controlnet_bottleneck_mode in (None, "effnet"):
            init_backbone_from_encoder(controlnet, models.effnet)
        if cfg.training:
            models.controlnet = self.parallelize(controlnet.requires_grad_(True))
        else:
            models.controlnet = controlnet.eval().requires_grad_(False)
        return models

    def get_cnet(self, batch, models, extras, cnet_input=None, **filter_kwargs):
        """(residuals, control input) for the batch's images, as upstream; `filter_kwargs` reach the filter (e.g.
        the inpainting filter's mask=, outpaint=, threshold=)."""
        if cnet_input is None:
            with torch.no_grad():
                cnet_input = extras.controlnet_filter(batch["images"].to(self.device), **filter_kwargs)
        return models.controlnet(cnet_input.to(self.device, self.dtype())), cnet_input

    def get_conditions(self, batch, models, extras, is_eval=False, is_unconditional=False, eval_image_embeds=False,
                       generators=None):
        """Stage C's conditions plus `cnet`, the ControlNet's residuals. In training they keep their graph (the
        base computes conditions without one). At evaluation the filter draws its random choices (masks) from a
        fixed seed, so the unconditional branch gets the conditional branch's residuals (SPEC §5)."""
        conditions = super().get_conditions(batch, models, extras, is_eval, is_unconditional, eval_image_embeds,
                                            generators)
        if is_eval:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.config.seed)
                conditions["cnet"] = self.get_cnet(batch, models, extras)[0]
        else:
            with torch.enable_grad():
                conditions["cnet"] = self.get_cnet(batch, models, extras)[0]
        return conditions

    def forward_pass(self, batch, extras, models):
        # the loop puts trained models in train mode; the backbone's BatchNorm statistics must not move
        distributed.unwrap(models.controlnet).backbone.eval()
        return super().forward_pass(batch, extras, models)

    def sample(self, batch, extras, models):
        """Stage C's sample grid with the control input (as a picture) as its second row."""
        grid = super().sample(batch, extras, models)
        if grid is None:
            return None
        n = min(len(batch["captions"]), self.config.sample_batch_size)
        images = batch["images"][:n].to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the masks the samples were made with
            control = extras.controlnet_filter(images)
        picture = extras.controlnet_filter.preview(images, control).float().cpu()
        width = grid.shape[-1] // n
        height = round(width * images.shape[-2] / images.shape[-1])
        picture = F.interpolate(picture, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
        row = torch.cat(list(picture), dim=-1)
        return torch.cat([grid[:, :height], row, grid[:, height:]], dim=-2)


if __name__ == "__main__":
    main(ControlNetCore)
