"""Stage B training (latent decoder): `python train/train_b.py configs/training/finetune_b_3b.yaml [key=value]`.

The frozen Stage A encodes images into the latents Stage B learns to generate, conditioned on EfficientNet latents
of the image (downscaled by U(0.5, 1), zeroed for a share of the samples) and on the pooled CLIP text embedding.
Training noise is pyramid noise (SPEC §5).
"""
import dataclasses
import os
import sys
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from core.conditioning import effnet_preprocess  # noqa: E402
from core.config import EXPECTED, ConfigError  # noqa: E402
from modules.gdf.noise import rand_per_sample, randn  # noqa: E402
from train.base import TrainingCore, effnet_input_size, main  # noqa: E402



def pyramid_noise(shape, generators, device, levels=10, size_range=(1, 16), discount=0.75, dtype=torch.float32):
    """Multi-resolution noise: N(0, I) plus coarser N(0, I) maps (level i at H/2^i × W/2^i, weight discount^i,
    nearest-upsampled), for the levels whose height or width lies in `size_range`; renormalised to unit variance.
    One generator per sample."""
    b, c, height, width = shape
    noise = randn(shape, generators, device, dtype)
    total = 1.0
    for i in range(1, levels):
        h, w = height // 2 ** i, width // 2 ** i
        if min(h, w) < 1:
            break
        if size_range[0] <= h <= size_range[1] or size_range[0] <= w <= size_range[1]:
            level = randn((b, c, h, w), generators, device, dtype)
            noise = noise + F.interpolate(level, size=(height, width), mode="nearest") * discount ** i
            total += discount ** (2 * i)
    return noise / total ** 0.5


class WurstCoreB(TrainingCore):
    """Trains Stage B on images and captions."""
    SAMPLING_DEFAULTS = {"cfg": 1.5, "shift": 1, "timesteps": 10}

    @dataclasses.dataclass(frozen=True)
    class Config(TrainingCore.Config):
        effnet_checkpoint_path: Optional[str] = EXPECTED
        stage_a_checkpoint_path: Optional[str] = EXPECTED
        effnet_dropout: float = 0.1  # share of training samples whose EfficientNet condition is zeroed
        # The encoder built when effnet_checkpoint_path is null: a modules.presets kind ('effnet', or the demo's
        # 'effnet_lite0', whose pretrained backbone comes from its package)
        effnet_model: str = "effnet"
        # Train the encoder's mapper (1×1 conv + BatchNorm onto the latent channels) with Stage B, as Würstchen
        # trained its EfficientNet latent space; the backbone stays frozen. The mapper is saved as `effnet`.
        train_effnet_mapper: bool = False
        effnet_scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0])
        # Upstream's multi-resolution training noise. Its coarse levels are those of 1 to 16 latents a side: nearly
        # nothing at 1024² (256² latents), but most of the noise at small sizes (the demo's 32² latents), where a
        # sampler starting from white noise then leaves the training distribution and diverges: set false there.
        pyramid_noise: bool = True

        IGNORED = {"shift": "Stage B trains at shift 1; upstream required this key but never used it"}

    @dataclasses.dataclass
    class Models(TrainingCore.Models):
        effnet: nn.Module = None
        stage_a: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(TrainingCore.Optimizers):
        effnet: Any = None  # with train_effnet_mapper

    @dataclasses.dataclass
    class Schedulers(TrainingCore.Schedulers):
        effnet: Any = None

    def setup_models(self, extras, skip_clip=False):
        """`skip_clip` (upstream's notebook habit): leave the text encoder out, to share Stage C's."""
        cfg = self.config
        effnet = self.unfreeze_mapper(self.load_frozen(cfg.effnet_model, cfg.effnet_checkpoint_path,
                                                       fresh_ok=cfg.train_effnet_mapper))
        stage_a = self.load_frozen("stage_a", cfg.stage_a_checkpoint_path)
        generator, generator_ema = self.setup_generator("stage_b")
        tokenizer, text_model = (None, None) if skip_clip else self.setup_text_model()
        return self.Models(effnet=effnet, stage_a=stage_a, generator=generator, generator_ema=generator_ema,
                           tokenizer=tokenizer, text_model=text_model)

    @property
    def CACHED_TENSORS(self):  # noqa: N802 (the base class's name); a trained mapper needs the backbone's features
        effnet = "effnet_features" if self.config.train_effnet_mapper else "effnet"
        return ("latents", effnet, "clip_text_pooled")

    def cache_tensors(self, batch, models):
        """Stage A latents, the EfficientNet's input at the one scale of `effnet_scale_range` (its backbone features
        in fp16 when the mapper trains, else its latents) and the pooled text embedding."""
        low, high = self.config.effnet_scale_range
        if low != high:
            raise ConfigError(f"a cache holds one EfficientNet scale: set effnet_scale_range to [s, s], not {[low, high]}")
        images = batch["images"].to(self.device, self.dtype())
        x = effnet_preprocess(self._effnet_images(images, low))
        if self.config.train_effnet_mapper:
            effnet = {"effnet_features": models.effnet.features(x).half()}
        else:
            effnet = {"effnet": models.effnet(x)}
        return {"latents": self.encode_latents(batch, models, None), **effnet,
                "clip_text_pooled": self.text_conditions(batch, models)["clip_text_pooled"]}

    @staticmethod
    def _effnet_images(images, factor):
        """Images rescaled (nearest) by `factor` to a multiple of the EfficientNet's stride."""
        return F.interpolate(images, size=effnet_input_size(images.shape[-2:], factor), mode="nearest")

    def trained_models(self):
        return ["generator", "effnet"] if self.config.train_effnet_mapper else ["generator"]

    def get_conditions(self, batch, models, extras, is_eval=False, is_unconditional=False, eval_image_embeds=False,
                       generators=None):
        """effnet: EfficientNet latents of the image (training: downscaled with NEAREST by one U(scale range)
        factor per batch to a multiple of 32, zeroed for `effnet_dropout` of the samples; evaluation: full size,
        zeros when unconditional); clip: the pooled text embedding."""
        clip = self.text_conditions(batch, models, is_unconditional,
                                    None if is_eval else generators)["clip_text_pooled"]
        cached = next((k for k in ("effnet_features", "effnet") if k in batch), None)
        if "images" not in batch and cached is None:
            return {"effnet": None, "clip": clip}
        n = len(batch["captions"])
        keep = torch.ones(n, dtype=torch.bool)
        if is_eval:
            keep[:] = not is_unconditional
        else:
            low, high = self.config.effnet_scale_range
            factor = low + (high - low) * torch.rand(1, generator=generators[0]).item()
            keep = rand_per_sample(generators) >= self.config.effnet_dropout
        if self.config.train_effnet_mapper:  # the loop puts trained models in train mode: the backbone stays frozen
            models.effnet.backbone.eval()
        with torch.set_grad_enabled(self.config.train_effnet_mapper and not is_eval):
            if cached == "effnet_features":
                effnet = models.effnet.mapper(batch[cached].to(self.device, self.dtype()))
            elif cached == "effnet":
                effnet = batch[cached].to(self.device, self.dtype())
            else:
                images = batch["images"].to(self.device, self.dtype())
                if not is_eval:
                    images = self._effnet_images(images, factor)
                effnet = models.effnet(effnet_preprocess(images))
            effnet = effnet * keep.to(effnet)[:, None, None, None]
        return {"effnet": effnet, "clip": clip}

    def encode_latents(self, batch, models, extras):
        if "latents" in batch:  # cached
            return batch["latents"].to(self.device, self.dtype())
        return models.stage_a.encode(batch["images"].to(self.device, self.dtype()))[0]

    def decode_latents(self, latents, batch, models, extras):
        return models.stage_a.decode(latents.to(self.dtype())).float().clamp(0, 1)

    def noise(self, latents, generators):
        if not self.config.pyramid_noise:
            return super().noise(latents, generators)
        return pyramid_noise(latents.shape, generators, latents.device, dtype=latents.dtype)


if __name__ == "__main__":
    main(WurstCoreB)
