"""The cascade: Stage C (text → 16-ch EfficientNet latents) → Stage B (→ Stage A latents) → Stage A (→ pixels).

One `generate` serves text-to-image, image variation (CLIP image embeddings as `clip_img`) and
image-to-image (EfficientNet latents of the input noised to `strength`); `reconstruct` runs Stages A+B as an
autoencoder. Every stage samples through `GDF.sample`, with upstream's defaults.
"""
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Union

import torch

from core.conditioning import (effnet_preprocess, encode_clip_image, encode_text)
from inference.lora import TokenGatedStageC, text_token_ids, token_gated_rows
from inference.utils import calculate_latent_sizes, to_pil
from modules.gdf import (GDF, CosineSchedule, CosineTNoiseCond, DDIMSampler, DDPMSampler, EpsilonTarget,
                         LCMSampler, P2LossWeight, VPScaler, VTarget, X0Target)

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "lcm": LCMSampler}
MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE = 128, 4096, 32


class PipelineError(ValueError):
    """Bad input to the pipeline; the message says what was wrong and what to pass instead."""


TARGETS = {"epsilon": EpsilonTarget, "v": VTarget, "x0": X0Target}


def cascade_gdf(target="epsilon"):
    """GDF exactly as every released stage is configured (SPEC §4); `target` is what the generator predicts (the
    released stages: epsilon; a stage trained here records its `gdf_target` in its file)."""
    if target not in TARGETS:
        raise PipelineError(f"unknown gdf_target {target!r}: use one of {sorted(TARGETS)}")
    return GDF(schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]), input_scaler=VPScaler(),
               target=TARGETS[target](), noise_cond=CosineTNoiseCond(), loss_weight=P2LossWeight())


@dataclass
class StageSampling:
    """How one stage samples. Defaults are upstream's Stage C settings; `STAGE_B_DEFAULTS` holds Stage B's."""
    steps: int = 20
    cfg: Optional[float] = 4.0
    shift: float = 2.0
    sampler: str = "ddpm"
    cfg_rho: float = 0.7

    def check(self, stage):
        if self.sampler not in SAMPLERS:
            raise PipelineError(f"stage {stage}: unknown sampler '{self.sampler}', choose one of {sorted(SAMPLERS)}")
        if int(self.steps) < 1:
            raise PipelineError(f"stage {stage}: steps must be ≥ 1, got {self.steps}")
        if self.shift <= 0:
            raise PipelineError(f"stage {stage}: shift must be > 0, got {self.shift}")


STAGE_C_DEFAULTS = StageSampling()
STAGE_B_DEFAULTS = StageSampling(steps=10, cfg=1.1, shift=1.0)


@dataclass
class CascadeOutput:
    images: torch.Tensor  # B, 3, H, W in [0, 1], float32 on the CPU
    latents_c: Optional[torch.Tensor]  # B, 16, h, w: Stage C's x0 (EfficientNet latent space)
    latents_b: torch.Tensor  # B, 4, H/4, W/4: Stage B's x0 (Stage A latent space)
    seeds: List[Optional[int]]
    settings: dict = field(default_factory=dict)
    control: Optional[torch.Tensor] = None  # B, 3, h, w: a picture of the ControlNet's input (edges, masked image)

    def pil(self):
        return to_pil(self.images)


def _as_list(x):
    return [x] if isinstance(x, str) else list(x)


def _cast_inputs(inputs, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


class _InDtype(torch.nn.Module):
    """Runs a model in its own (non-fp32) dtype while the sampler keeps fp32 latents (bf16 weights need no
    autocast); fp32 models are called directly."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, r, **kwargs):
        return self.model(x.to(self.dtype), r.to(self.dtype), **kwargs).float()


class StableCascadePipeline:
    """Holds the models; `generate` and `reconstruct` are the entry points (see module docstring)."""

    def __init__(self, stage_c, stage_b, stage_a, effnet, text_model, tokenizer, previewer=None,
                 vision_model=None, device="cpu", dtype=torch.float32, offload=False, stage_c_compression=42.67):
        self.stage_c, self.stage_b, self.stage_a, self.effnet = stage_c, stage_b, stage_a, effnet
        self.previewer, self.text_model, self.tokenizer = previewer, text_model, tokenizer
        self._vision_model = vision_model
        self.loras = []  # inference.lora.LoadedLoRA, in the order they were applied
        self.vision_loader: Optional[Callable[[], torch.nn.Module]] = None
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload
        self.stage_c_compression = stage_c_compression  # output pixels per Stage C latent (PipelineConfig)
        # each stage samples with the objective it was trained with (inference.loading sets `gdf_target`)
        self.gdf_c = cascade_gdf(getattr(stage_c, "gdf_target", "epsilon"))
        self.gdf_b = cascade_gdf(getattr(stage_b, "gdf_target", "epsilon"))
        for m in self._models():
            m.eval().requires_grad_(False)
            m.to("cpu" if offload else self.device)

    @property
    def effnet_stride(self) -> int:
        """Image pixels per EfficientNet latent, a side: 32 (EfficientNetV2-S; Lite0's head), 16 for the demo's
        stride-16 Lite0 features. Images the encoder (or a ControlNet) sees are sized by it."""
        return getattr(self.effnet, "feature_stride", 32)

    def load_lora(self, source, scale=1.0, merge=False, train_tokens=None):
        """Applies a LoRA file (or a LoRA config naming one and its train_tokens) to Stage C and the text encoder;
        returns its handle, whose `scale`, `merge()`, `unmerge()` and `remove()` act on the models in place."""
        from inference.lora import load_lora
        return load_lora(self, source, scale=scale, merge=merge, train_tokens=train_tokens)

    def _models(self):
        return [m for m in (self.stage_c, self.stage_b, self.stage_a, self.effnet, self.previewer,
                            self.text_model, self._vision_model) if m is not None]

    # ---------------------------------------------------------------- device placement (sequential offload)
    def _on_device(self, model):
        """With `offload`, moves one model to the accelerator for its stage and back after, so peak accelerator
        memory is about the largest stage; without it, models live on the device already."""
        pipeline = self

        class _Placement:
            def __enter__(self):
                if pipeline.offload:
                    model.to(pipeline.device)
                return model

            def __exit__(self, *exc):
                if pipeline.offload:
                    model.to("cpu")

        return _Placement()

    @property
    def vision_model(self):
        if self._vision_model is None:
            if self.vision_loader is None:
                raise PipelineError("image variation needs a CLIP image encoder, and this pipeline has none "
                                    "(set image_encoder_path in the config)")
            self._vision_model = self.vision_loader().eval().requires_grad_(False)
            self._vision_model.to("cpu" if self.offload else self.device)
        return self._vision_model

    # ----------------------------------------------------------------------------------------- conditions
    def encode_prompts(self, prompts, negative_prompts):
        """Stage 1: CLIP text conditions for the conditional and unconditional branches (each prompt once)."""
        with self._on_device(self.text_model) as text_model:
            cond = encode_text(text_model, self.tokenizer, prompts, device=self.device)
            uncond = encode_text(text_model, self.tokenizer, negative_prompts, device=self.device)
        return cond, uncond

    def _token_gated_rows(self, prompts, negative_prompts):
        """(prompt rows, negative-prompt rows) of `inference.lora.token_gated_rows` for the loaded LoRAs, from the
        texts as the text encoder reads them (tokenised, truncated); None without a token-gated LoRA."""
        if not any(lora.token_gated for lora in self.loras):
            return None
        rows = token_gated_rows(self.loras, text_token_ids(self.tokenizer, [*prompts, *negative_prompts]))
        rows = rows.to(self.device)
        return rows[:len(prompts)], rows[len(prompts):]

    @torch.inference_mode()
    def encode_effnet(self, images):
        """[0,1] images (B×3×H×W) → EfficientNet latents B×16×H/32×W/32."""
        with self._on_device(self.effnet) as effnet:
            x = effnet_preprocess(images.to(self.device, torch.float32)).to(self.dtype)
            return effnet(x).float()

    @torch.inference_mode()
    def preview(self, latents_c):
        """Previewer RGB (8× the latent size) of Stage C latents, in [0,1]."""
        if self.previewer is None:
            raise PipelineError("this pipeline has no previewer (set previewer_checkpoint_path)")
        with self._on_device(self.previewer) as previewer:
            return previewer(latents_c.to(self.device, self.dtype)).float().clamp(0, 1)

    # ------------------------------------------------------------------------------------------- sampling
    def _generators(self, seeds):
        return [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def _sample(self, stage, model, gdf, cond, uncond, shape, settings, generators, x_init=None, t_start=1.0,
                callback=None):
        settings.check(stage)
        steps = max(1, int(settings.steps))
        cfg = settings.cfg if settings.cfg not in (None, 1, 1.0) else None
        sampler = SAMPLERS[settings.sampler](gdf)
        runner = model if self.dtype == torch.float32 else _InDtype(model, self.dtype)  # fp32: no wrapper call
        cond, uncond = _cast_inputs(cond, self.dtype), _cast_inputs(uncond, self.dtype)
        x0 = None
        sampling = gdf.sample(runner, cond, shape, uncond if cfg is not None else None, sampler=sampler,
                              t_start=t_start, timesteps=steps, x_init=x_init, cfg=cfg, cfg_rho=settings.cfg_rho,
                              shift=settings.shift, device=self.device, generator=generators)
        for i, (x0, _, _) in enumerate(sampling):
            if callback is not None:
                callback(stage=stage, step=i + 1, total=steps, latents=x0)
        return x0.float()

    def _check_size(self, height, width):
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise PipelineError(f"{name} must be an integer number of pixels, got {v!r}")
            if not MIN_SIDE <= v <= MAX_SIDE:
                raise PipelineError(f"{name}={v} is outside the supported range [{MIN_SIDE}, {MAX_SIDE}] pixels")
        fixed = tuple(int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE for v in (height, width))
        if fixed != (height, width):
            warnings.warn(f"size {height}×{width} rounded to {fixed[0]}×{fixed[1]} (multiples of {SIZE_MULTIPLE})",
                          stacklevel=3)
        return fixed

    @torch.inference_mode()
    def generate(self, prompt: Union[str, Sequence[str]] = "", negative_prompt: Union[str, Sequence[str]] = "",
                 num_images: int = 1, height: int = 1024, width: int = 1024, seed: Optional[int] = None,
                 generators_c=None, generators_b=None, stage_c: StageSampling = STAGE_C_DEFAULTS,
                 stage_b: StageSampling = STAGE_B_DEFAULTS, variation_images: Optional[torch.Tensor] = None,
                 init_image: Optional[torch.Tensor] = None, strength: float = 1.0, latents_c=None,
                 conditions=None, callback=None, preview_every: int = 0, controlnet=None,
                 control_image: Optional[torch.Tensor] = None, control_mask: Optional[torch.Tensor] = None,
                 outpaint: bool = False, control_strength: float = 1.0) -> CascadeOutput:
        """Text-to-image; with `variation_images` image variation, with `init_image` + `strength` image-to-image.

        Image i of the batch uses seed `seed + i` in both stages, so it equals the image that seed gives alone.
        `latents_c` skips Stage C (precomputed EfficientNet-space latents); `conditions` = (cond, uncond) skips
        the text encoder (a token-gated LoRA still decides per row from `prompt` and `negative_prompt`). `callback(stage=, step=, total=, latents=, preview=)` is called after every step;
        `preview` is a Previewer image every `preview_every` Stage C steps (else None).
        `controlnet` (inference.controlnet.load_controlnet) adds its residuals for `control_image` (inpainting:
        `control_mask`, white = fill; `outpaint` inverts it), scaled by `control_strength`, to both CFG branches;
        super resolution makes an image twice the control image's size.
        """
        prompts = _as_list(prompt)
        negatives = _as_list(negative_prompt)
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise PipelineError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
        if not isinstance(num_images, int) or num_images < 1:
            raise PipelineError(f"num_images must be a positive integer, got {num_images!r}")
        height, width = self._check_size(height, width)
        if controlnet is not None:
            control_image = self._check_images(control_image, "control_image")
            controlnet.check_size(control_image, height, width)
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]
        batch = len(prompts)
        if seed is None and (generators_c is None or generators_b is None):
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = [seed + i for i in range(batch)] if seed is not None else [None] * batch
        generators_c = generators_c if generators_c is not None else self._generators(seeds)
        generators_b = generators_b if generators_b is not None else self._generators(seeds)
        shape_c, shape_b = calculate_latent_sizes(height, width, batch, compression_factor_b=self.stage_c_compression)

        # Stage 1: conditions
        cond, uncond = conditions if conditions is not None else self.encode_prompts(prompts, negatives)
        uncond_img = torch.zeros(batch, 1, self.stage_c.clip_img_mapper.in_features, device=self.device)
        clip_img = uncond_img
        if variation_images is not None:
            images = self._check_images(variation_images, "variation_images")
            with self._on_device(self.vision_model) as vision:
                embeds = encode_clip_image(vision, images.to(self.device)).float()
            clip_img = embeds.repeat_interleave(batch // embeds.shape[0], 0) if embeds.shape[0] != batch else embeds
        cond_c = {"clip_text": cond["clip_text"], "clip_text_pooled": cond["clip_text_pooled"], "clip_img": clip_img}
        uncond_c = {"clip_text": uncond["clip_text"], "clip_text_pooled": uncond["clip_text_pooled"],
                    "clip_img": uncond_img}
        gated = self._token_gated_rows(prompts, negatives)
        if gated is not None:  # token-gated LoRAs act on the rows whose text holds their tokens only
            cond_c["lora_rows"], uncond_c["lora_rows"] = gated
        control = None
        if controlnet is not None:  # the same residuals in both CFG branches (SPEC §5)
            cond_c["cnet"], control = controlnet.residuals(self, control_image, shape_c, control_mask, outpaint,
                                                           control_strength)
            uncond_c["cnet"] = cond_c["cnet"]

        # Stage 2: Stage C prior in EfficientNet latent space
        if latents_c is None:
            x_init, t_start, settings_c = None, 1.0, stage_c
            if init_image is not None:
                if not 0.0 <= float(strength) <= 1.0:
                    raise PipelineError(f"strength must lie in [0, 1], got {strength}")
                image = self._check_images(init_image, "init_image")
                stride = self.effnet_stride
                image = torch.nn.functional.interpolate(image.float(),
                                                        size=(shape_c[2] * stride, shape_c[3] * stride),
                                                        mode="bilinear", align_corners=False, antialias=True)
                clean = self.encode_effnet(image.clamp(0, 1))
                clean = clean.repeat_interleave(batch // clean.shape[0], 0) if clean.shape[0] != batch else clean
                t_start = float(strength)
                settings_c = replace(stage_c, steps=int(stage_c.steps * t_start))
                # noise at the same shift the sampler uses (upstream noises at shift 1 and samples at shift 2)
                t = torch.full((batch,), t_start, device=self.device)
                x_init = self.gdf_c.diffuse(clean, t=t, shift=stage_c.shift, generator=generators_c)[0]
            if init_image is not None and settings_c.steps < 1:
                latents_c = clean  # strength 0 (or too few steps): the input image's own latents
            else:
                with self._on_device(self.stage_c) as model:
                    if gated is not None:
                        model = TokenGatedStageC(model, self.loras)
                    latents_c = self._sample("C", model, self.gdf_c, cond_c, uncond_c, shape_c, settings_c,
                                             generators_c, x_init=x_init, t_start=t_start,
                                             callback=self._preview_callback(callback, preview_every))
        latents_c = latents_c.to(self.device, torch.float32)

        # Stage 3: Stage B decoder in Stage A latent space, conditioned on Stage C's output
        cond_b = {"effnet": latents_c, "clip": cond["clip_text_pooled"]}
        uncond_b = {"effnet": torch.zeros_like(latents_c), "clip": uncond["clip_text_pooled"]}
        with self._on_device(self.stage_b) as model:
            latents_b = self._sample("B", model, self.gdf_b, cond_b, uncond_b, shape_b, stage_b, generators_b,
                                     callback=callback)

        # Stage 4: Stage A decodes to pixels
        images = self.decode(latents_b)
        settings = {"prompt": prompts, "negative_prompt": negatives, "height": height, "width": width,
                    "seeds": seeds, "stage_c": asdict(stage_c), "stage_b": asdict(stage_b),
                    "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                    "mode": "image-to-image" if init_image is not None else
                    "variation" if variation_images is not None else "text-to-image"}
        if init_image is not None:
            settings["strength"] = float(strength)
        if controlnet is not None:
            settings.update(controlnet.describe(), control_strength=float(control_strength), outpaint=bool(outpaint))
        if self.loras:
            settings["loras"] = [lora.describe() for lora in self.loras]
        return CascadeOutput(images=images, latents_c=latents_c.cpu(), latents_b=latents_b.cpu(), seeds=seeds,
                             settings=settings, control=control)

    def _preview_callback(self, callback, every):
        if callback is None:
            return None

        def wrapped(stage, step, total, latents):
            show = self.previewer is not None and every and (step % every == 0 or step == total)
            callback(stage=stage, step=step, total=total, latents=latents,
                     preview=self.preview(latents) if show else None)
        return wrapped

    @staticmethod
    def _check_images(images, name):
        if not torch.is_tensor(images):
            raise PipelineError(f"{name} must be a tensor B×3×H×W (or 3×H×W) in [0,1]; load files with "
                                "inference.utils.load_image")
        images = images[None] if images.dim() == 3 else images
        if images.dim() != 4 or images.shape[1] != 3:
            raise PipelineError(f"{name} must have shape B×3×H×W, got {tuple(images.shape)}")
        return images

    @torch.inference_mode()
    def decode(self, latents_b):
        """Stage A: latents → [0,1] images (float32, CPU); Stage A itself does not clamp."""
        with self._on_device(self.stage_a) as stage_a:
            return stage_a.decode(latents_b.to(self.device, self.dtype)).float().clamp(0, 1).cpu()

    @torch.inference_mode()
    def reconstruct(self, images, compression: Optional[float] = None, caption: str = "", seed: int = 0,
                    stage_b: StageSampling = STAGE_B_DEFAULTS, callback=None) -> CascadeOutput:
        """Stages A+B as an autoencoder: image → 16×h×w EfficientNet latents → image.

        `compression` scales the image before the EfficientNet (upstream's notebook uses ¾: a 1024² image
        becomes 24×24×16 latents, ~42× spatial compression); by default the scale Stage C generates at
        (`effnet_stride` / `stage_c_compression`: ¾ for the released models, 1 for the demo). The output has the
        input's size.
        """
        stride = self.effnet_stride
        if compression is None:  # rounded: 32 / 42.67 is upstream's ¾ (42.67 itself rounds 128/3)
            compression = round(stride / self.stage_c_compression, 3)
        images = self._check_images(images, "images").float().clamp(0, 1)
        h, w = images.shape[-2:]
        if h % 4 or w % 4:
            raise PipelineError(f"image size {h}×{w} must be divisible by 4 (Stage A works at 4× compression)")
        if not 0 < compression <= 1:
            raise PipelineError(f"compression must lie in (0, 1], got {compression}")
        eh, ew = int(h * compression // stride * stride), int(w * compression // stride * stride)
        if eh < stride or ew < stride:
            raise PipelineError(f"compression {compression} leaves less than {stride} px of a {h}×{w} image")
        small = torch.nn.functional.interpolate(images, size=(eh, ew), mode="nearest")
        latents_c = self.encode_effnet(small.to(self.device))
        batch = images.shape[0]
        cond, uncond = self.encode_prompts([caption] * batch, [""] * batch)
        cond_b = {"effnet": latents_c, "clip": cond["clip_text_pooled"]}
        uncond_b = {"effnet": torch.zeros_like(latents_c), "clip": uncond["clip_text_pooled"]}
        seeds = [seed + i for i in range(batch)]
        with self._on_device(self.stage_b) as model:
            latents_b = self._sample("B", model, self.gdf_b, cond_b, uncond_b, (batch, 4, h // 4, w // 4), stage_b,
                                     self._generators(seeds), callback=callback)
        out = self.decode(latents_b)
        return CascadeOutput(images=out, latents_c=latents_c.cpu(), latents_b=latents_b.cpu(), seeds=seeds,
                             settings={"mode": "reconstruction", "compression": compression,
                                       "stage_b": asdict(stage_b), "ratio": (3 * h * w) / (16 * latents_c.shape[-2]
                                                                                           * latents_c.shape[-1])})
