"""Previewer training: `python train/train_previewer.py configs/training/demo_previewer.yaml [key=value ...]`.

Upstream released a Previewer but no trainer. The Previewer shows Stage C's 16-channel EfficientNet latents as a
small RGB image (8× the latent size) while Stage C samples, without running Stages B and A. This trainer makes the
latents with the frozen EfficientNet encoder from the training image, rescaled as Stage C's latents are made
(e.g. the latents of the 3/4-size image, upstream's habit), and regresses the Previewer's output on the image
resized to the preview's size: MSE (+ optional L1).

With `train_effnet_mapper` the encoder's mapper (the 1×1 conv + BatchNorm that makes the latent channels from the
frozen backbone's features) trains with the Previewer: a direct objective for the latent space, that it keep what
the image needs to be redrawn. The demo cascade makes its latent space this way, before Stage B and Stage C train
on it: learnt only through Stage B's diffusion loss, a small mapper kept little more than the background colour.
"""
import copy
import dataclasses
import os
import sys
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from core import distributed  # noqa: E402
from core.conditioning import effnet_preprocess  # noqa: E402
from core.config import EXPECTED, ConfigError  # noqa: E402
from core.warpcore import WarpCore  # noqa: E402
from core.weights import load_model, recorded_kind  # noqa: E402
from modules.presets import build_model  # noqa: E402
from train.base import DataConfig, DataCore, effnet_input_size, main  # noqa: E402

def resize(images: torch.Tensor, size) -> torch.Tensor:
    """Antialiased bilinear resize in float32, as the data pipeline resizes (core.data.crop): the encoder then
    sees the images Stage C's latents were made from, and the target is the image's low-pass, not its aliases."""
    return F.interpolate(images.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)


def load_encoder(path: str, dtype: torch.dtype) -> nn.Module:
    """The frozen EfficientNet, as the kind its file records (the demo's 'effnet_lite0'); a file that records none
    (the released effnet_encoder) is the class-default 'effnet'."""
    return load_model(path, kind=recorded_kind(path, "effnet"), dtype=dtype)


class WurstCorePreviewer(DataCore):
    """Trains the Previewer on EfficientNet latents of the training images.

    Uses DataCore's image pipeline but no text encoder (its Config and Models leave it out, as WurstCoreA's do).
    The encoder is loaded frozen, in eval mode (the loop only switches trained models to train mode), and runs
    without gradients; the trained model is called `generator`, so its files are generator(_ema).safetensors.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(WarpCore.Config, DataConfig):
        model_version: str = EXPECTED  # a modules.presets previewer preset: 'default' (released), 'demo', 'tiny'
        model_kwargs: Optional[dict] = None  # constructor overrides on top of the preset
        generator_checkpoint_path: Optional[str] = None  # weights to start from; None: random init
        # The encoder whose latents the Previewer learns to show; null with train_effnet_mapper: a new mapper on the
        # pretrained backbone of `effnet_model` (the demo's 'effnet_lite0' backbone ships in its package)
        effnet_checkpoint_path: Optional[str] = EXPECTED
        effnet_model: str = "effnet"
        effnet_preset: Optional[str] = None  # its modules.presets preset (the demo's 'effnet_lite0' is 'demo')
        train_effnet_mapper: bool = False  # train the encoder's mapper too (saved as `effnet`)
        # The image is rescaled by this (to a multiple of 32) before the encoder: Stage C's latents are those of
        # the image at this scale (upstream ¾; the demo 1: 128² scenes → 8×8 latents), so the Previewer sees those.
        effnet_scale: float = 0.75
        mse_weight: float = 1.0
        l1_weight: float = 0.0
        sample_batch_size: int = 4  # images per sample grid

        def __post_init__(self):
            super().__post_init__()
            if not self.effnet_scale > 0:
                raise ConfigError(f"effnet_scale must be positive, got {self.effnet_scale}")
            for name in ("mse_weight", "l1_weight"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
            if self.mse_weight == 0 and self.l1_weight == 0:
                raise ConfigError("mse_weight and l1_weight are both 0: nothing to train")
            if self.effnet_checkpoint_path is None and not self.train_effnet_mapper:
                raise ConfigError("effnet_checkpoint_path is null: name the encoder's file, or set "
                                  "train_effnet_mapper: true to train a new mapper on the pretrained backbone")
            if self.cached_webdataset_path:
                raise ConfigError("the previewer trainer encodes images every step and reads no cache: "
                                  "unset cached_webdataset_path")

    @dataclasses.dataclass
    class Models(WarpCore.Models):
        generator: nn.Module = None
        generator_ema: nn.Module = None
        effnet: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):
        generator: Any = None
        effnet: Any = None  # with train_effnet_mapper

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        generator: Any = None
        effnet: Any = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = []  # per micro-batch of the current update

    # ---------------------------------------------------------------------------------------------- set-up
    def trained_models(self) -> list:
        return ["generator", "effnet"] if self.config.train_effnet_mapper else ["generator"]

    def setup_models(self, extras):
        cfg = self.config
        if cfg.effnet_checkpoint_path is None:
            effnet = build_model(cfg.effnet_model, cfg.effnet_preset)
        else:
            effnet = load_encoder(cfg.effnet_checkpoint_path, self.dtype())
        effnet = self.unfreeze_mapper(effnet.to(self.device, self.dtype()).eval().requires_grad_(False))
        if cfg.generator_checkpoint_path is not None:
            generator = load_model(cfg.generator_checkpoint_path, kind="previewer", preset=cfg.model_version,
                                   kwargs=cfg.model_kwargs or {}, dtype=self.dtype())
        else:
            generator = build_model("previewer", cfg.model_version, dtype=self.dtype(), **(cfg.model_kwargs or {}))
            # The default init makes zero-mean previews of about unit std (6 dB on the demo scenes), and Adam then
            # spends its first hundred or so updates shrinking them and moving the output bias to the images'
            # mean: start from faint variations on mid-grey instead (9 dB).
            with torch.no_grad():
                out = generator.blocks[-1]
                out.weight.mul_(0.1)
                out.bias.fill_(0.5)
        generator = generator.to(self.device)
        if not cfg.training:
            return self.Models(generator=generator.eval().requires_grad_(False), effnet=effnet)
        generator.train().requires_grad_(True)
        ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.use_ema else None
        generator = self.parallelize(generator)
        if ema is not None and cfg.use_fsdp and self.env.is_distributed:  # sharded like the generator it follows
            ema = distributed.wrap(ema, self.env, self.device, True, (), self.autocast_dtype())
        return self.Models(generator=generator, generator_ema=ema, effnet=effnet)

    # ---------------------------------------------------------------------------------------------- training
    def encode_latents(self, images: torch.Tensor, models) -> torch.Tensor:
        """The encoder's latents of [0, 1] images rescaled by `effnet_scale`: the backbone always frozen, the mapper
        with gradients while it trains."""
        x = resize(images, effnet_input_size(images.shape[-2:], self.config.effnet_scale))
        effnet = models.effnet
        with torch.no_grad():
            effnet.backbone.eval()  # the loop puts trained models in train mode: the backbone keeps its statistics
            features = effnet.features(effnet_preprocess(x.to(self.dtype())))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_effnet_mapper):
            return effnet.mapper(features)

    def targets(self, images: torch.Tensor, previews: torch.Tensor) -> torch.Tensor:
        """What the previews should look like: the images resized to the previews' size."""
        return resize(images, previews.shape[-2:]).clamp(0, 1)

    def forward_pass(self, batch, extras, models):
        cfg = self.config
        images = batch["images"].to(self.device, self.dtype())
        latents = self.encode_latents(images, models)
        previews = models.generator(latents)
        targets = self.targets(images, previews)
        error = previews.float() - targets
        mse, l1 = error.square().mean(dim=[1, 2, 3]), error.abs().mean(dim=[1, 2, 3])
        loss = cfg.mse_weight * mse + cfg.l1_weight * l1
        with torch.no_grad():
            clamped_mse = (previews.detach().float().clamp(0, 1) - targets).square().mean(dim=[1, 2, 3])
            psnr = -10 * torch.log10(clamped_mse.clamp_min(1e-10))
            metrics = {"mse": mse.mean(), "l1": l1.mean(), "psnr": psnr.mean()}
        self._metrics.append({k: v.detach().float().cpu() for k, v in metrics.items()})
        return loss, loss.mean() / cfg.grad_accum_steps

    def update_metrics(self) -> dict:
        """Means over the update's micro-batches and processes: mse, l1 and psnr (dB, of the preview clamped to
        [0, 1], which is how the pipeline shows it)."""
        collected, self._metrics = self._metrics, []
        if not collected:
            return {}
        names = list(collected[0])
        means = torch.stack([torch.stack([m[k] for m in collected]).mean() for k in names]).to(self.device)
        return dict(zip(names, (distributed.all_reduce(means) / self.env.world_size).tolist()))

    @torch.no_grad()
    def previews(self, images: torch.Tensor, models, generator: Optional[nn.Module] = None) -> tuple:
        """(targets, previews) of [0, 1] images: what a Previewer (default: the trained one) makes of their latents,
        clamped as the pipeline shows it, and the resized images it is compared with."""
        images = images.to(self.device, self.dtype())
        generator = models.generator if generator is None else generator
        previews = generator(self.encode_latents(images, models)).float().clamp(0, 1)
        return self.targets(images, previews), previews

    def sample(self, batch, extras, models):
        """Rows: the input images resized to the previews' size, then the previews of the model and its EMA."""
        images = batch["images"][:self.config.sample_batch_size]
        targets, previews = self.previews(images, models)
        rows = [targets, previews]
        if models.generator_ema is not None:
            rows.append(self.previews(images, models, models.generator_ema)[1])
        rows = [r.float().cpu() for r in rows]
        return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)


if __name__ == "__main__":
    main(WurstCorePreviewer)
