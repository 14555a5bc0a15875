"""Stage C training (text-to-image prior): `python train/train_c.py configs/training/finetune_c_3b.yaml [key=value]`.

The frozen EfficientNet encoder turns images into the 16-channel latents Stage C learns to generate, conditioned on
CLIP text embeddings and, for a share of the samples, on the image's CLIP embedding. ControlNet and LoRA trainers
subclass `WurstCoreC` and keep its conditions and loss.
"""
import dataclasses
import os
import sys
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.conditioning import (effnet_preprocess, encode_clip_image, load_vision_encoder,  # noqa: E402
                               random_vision_encoder, tiny_vision_config)
from core import distributed  # noqa: E402
from core.config import EXPECTED  # noqa: E402
from modules.gdf.noise import rand_per_sample  # noqa: E402
from modules.presets import TINY_CLIP_IMAGE_DIM  # noqa: E402
from train.base import TINY, TrainingCore, main  # noqa: E402


class WurstCoreC(TrainingCore):
    """Trains Stage C on images and captions."""
    SAMPLING_DEFAULTS = {"cfg": 5, "shift": 1, "timesteps": 20}

    @dataclasses.dataclass(frozen=True)
    class Config(TrainingCore.Config):
        effnet_checkpoint_path: Optional[str] = EXPECTED
        previewer_checkpoint_path: Optional[str] = EXPECTED
        # a folder with a CLIPVisionModelWithProjection (`bash models/download_models.sh clip`), or 'tiny'
        clip_image_model_name: str = "models/image_encoder"
        clip_image_p: float = 0.1  # share of training samples also conditioned on their CLIP image embedding

    @dataclasses.dataclass
    class Models(TrainingCore.Models):
        effnet: nn.Module = None
        previewer: nn.Module = None
        image_model: nn.Module = None

    CACHED_TENSORS = ("latents", "clip_text", "clip_text_pooled", "clip_img")

    def setup_models(self, extras):
        cfg = self.config
        effnet = self.load_frozen("effnet", cfg.effnet_checkpoint_path)
        previewer = None  # without one (the demo model has none) sample grids are skipped
        if cfg.previewer_checkpoint_path is not None or cfg.model_version == TINY:
            previewer = self.load_frozen("previewer", cfg.previewer_checkpoint_path)
        generator, generator_ema = self.setup_generator("stage_c")
        tokenizer, text_model = self.setup_text_model()
        return self.Models(effnet=effnet, previewer=previewer, generator=generator, generator_ema=generator_ema,
                           tokenizer=tokenizer, text_model=text_model, image_model=self.setup_image_model())

    def setup_image_model(self) -> nn.Module:
        name = self.config.clip_image_model_name
        if name == TINY:
            model = random_vision_encoder(tiny_vision_config(projection=TINY_CLIP_IMAGE_DIM), seed=self.config.seed)
            return model.to(self.device, self.dtype())
        return load_vision_encoder(name, dtype=self.dtype(), device=self.device)

    def get_conditions(self, batch, models, extras, is_eval=False, is_unconditional=False, eval_image_embeds=False,
                       generators=None):
        """clip_text, clip_text_pooled (captions; "" when unconditional) and clip_img: the CLIP image embedding
        for `clip_image_p` of the training samples, at evaluation only with `eval_image_embeds`; else zeros."""
        conditions = self.text_conditions(batch, models, is_unconditional, None if is_eval else generators)
        n = len(batch["captions"])
        width = distributed.unwrap(models.generator).clip_img_mapper.in_features
        clip_img = torch.zeros(n, 1, width, device=self.device)
        have = "images" in batch or "clip_img" in batch
        if is_eval:
            use = torch.full((n,), eval_image_embeds and not is_unconditional and have)
        else:
            use = rand_per_sample(generators) < self.config.clip_image_p
        if use.any():
            if "clip_img" in batch:  # cached
                clip_img[use.to(self.device)] = batch["clip_img"][use].to(self.device, clip_img.dtype)
            else:
                images = batch["images"][use].to(self.device)
                clip_img[use.to(self.device)] = encode_clip_image(models.image_model, images).float()
        conditions["clip_img"] = clip_img
        return conditions

    def cache_tensors(self, batch, models):
        """EfficientNet latents, text conditions and image embedding of every sample."""
        images = batch["images"].to(self.device, self.dtype())
        return {"latents": self.encode_latents(batch, models, None),
                **self.text_conditions(batch, models),
                "clip_img": encode_clip_image(models.image_model, images).float()}

    def encode_latents(self, batch, models, extras):
        if "latents" in batch:  # cached
            return batch["latents"].to(self.device, self.dtype())
        images = batch["images"].to(self.device, self.dtype())
        return models.effnet(effnet_preprocess(images))

    def decode_latents(self, latents, batch, models, extras):
        return models.previewer(latents.to(self.dtype()))

    def sample(self, batch, extras, models):
        """Previewer images of the sample grid (none without a previewer or, cached, without images to show)."""
        if models.previewer is None or "images" not in batch:
            return None
        return super().sample(batch, extras, models)


if __name__ == "__main__":
    main(WurstCoreC)
