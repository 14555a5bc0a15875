"""Stage A training (the f4 VQGAN): `python train/train_a.py configs/training/demo_a.yaml [key=value ...]`.

Upstream released Stage A's weights but no trainer. This one trains it to reconstruct images: MSE (+ optional L1)
+ the VQ loss the model returns (codebook + 0.25 · commitment), with an optional hinge-loss PatchGAN. Each saved
Stage A records a `scale_factor` calibrated on the training data, so that its latents have unit standard deviation,
as Stage B's diffusion expects (the released model's 0.43 is such a number).
"""
import contextlib
import copy
import dataclasses
import math
import os
import sys
import types
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from core import distributed  # noqa: E402
from core.config import EXPECTED, ConfigError  # noqa: E402
from core.warpcore import WarpCore  # noqa: E402
from core.weights import load_model, model_metadata  # noqa: E402
from modules.gdf.noise import rand_per_sample  # noqa: E402
from modules.presets import build_model  # noqa: E402
from modules.stage_a import ResBlock  # noqa: E402
from train.base import DataConfig, DataCore, main  # noqa: E402


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, arXiv:1611.07004): a real/fake logit per overlapping patch, judging the local texture
    that an MSE-trained decoder blurs. GroupNorm instead of pix2pix's BatchNorm, so that real and fake images can
    share one forward without a sample's logit depending on its batch-mates."""

    def __init__(self, c_hidden=64, layers=3):
        super().__init__()
        blocks, c = [nn.Conv2d(3, c_hidden, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)], c_hidden
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(c, 2 * c, kernel_size=4, stride=2, padding=1), nn.GroupNorm(math.gcd(8, 2 * c), 2 * c),
                       nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(nn.Conv2d(c, 1, kernel_size=3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x):  # B, 3, H, W in [0, 1] -> B, 1, H / 2^layers, W / 2^layers
        return self.net(x * 2 - 1)


class LatentStd:
    """Running standard deviation of Stage A's unscaled latents: a bias-corrected exponential average of their
    first two moments over recent batches (all processes pooled), so that it follows the encoder as it trains.
    Saved with the training state, so a resumed run records the same scale as an uninterrupted one."""

    def __init__(self, decay: float):
        self.decay = decay
        self.moments = torch.zeros(2, dtype=torch.float64)  # E[x], E[x²], decayed
        self.weight = 0.0  # the decayed count of batches, which corrects the zero start

    @torch.no_grad()
    def update(self, latents: torch.Tensor):
        x = latents.detach().double()
        stats = distributed.all_reduce(torch.stack([x.sum(), x.square().sum(), x.new_tensor(x.numel())])).cpu()
        if torch.isfinite(stats).all():
            self.moments = self.decay * self.moments + (1 - self.decay) * stats[:2] / stats[2]
            self.weight = self.decay * self.weight + (1 - self.decay)

    def value(self) -> Optional[float]:
        if self.weight == 0:
            return None
        mean, square = (self.moments / self.weight).tolist()
        return math.sqrt(max(square - mean ** 2, 0.0))

    def state_dict(self) -> dict:
        return {"moments": self.moments.clone(), "weight": self.weight}

    def load_state_dict(self, state: dict):
        self.moments, self.weight = state["moments"].clone(), float(state["weight"])


@contextlib.contextmanager
def quantizer_tap(stage_a, use_code: torch.Tensor):
    """While open, Stage A's quantizer hands the decoder the code where `use_code` (B bools) is set and the encoder's
    output elsewhere, and records the unscaled latents and code indices. A hook rather than separate encode/decode
    calls, so that training goes through the model's forward, which DDP and FSDP require."""
    record = types.SimpleNamespace(latents=None, indices=None)

    def hook(module, args, output):
        latents, (quantized, losses, indices) = args[0], output  # B, C, h, w unscaled; B, h, w
        record.latents, record.indices = latents.detach(), indices
        return torch.where(use_code.view(-1, 1, 1, 1), quantized, latents), losses, indices

    handle = stage_a.vquantizer.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Gradients flow through `model` to its input but not into its weights (the generator's adversarial term)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def stored_statistics(module, args):
    """Forward pre-hook: the BatchNorm normalises with its stored statistics, whatever mode the trainer set."""
    module.train(False)


class WurstCoreA(DataCore):
    """Trains Stage A (the VQGAN) to reconstruct images.

    Uses DataCore's image pipeline (core.data) but no text encoder: its Config and Models leave the text encoder's
    settings out. With `adversarial_weight` > 0 a PatchGAN trains alongside from update `adversarial_start` on,
    with its own optimizer, stepped in the same update as the generator (one backward: the generator's adversarial
    term runs through a frozen discriminator, the discriminator's loss on detached reconstructions); gradient
    clipping, as everywhere in WarpCore, is over the norm of both models' gradients together.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(WarpCore.Config, DataConfig):
        model_version: str = EXPECTED  # a modules.presets stage_a preset: 'default' (released), 'demo', 'tiny'
        model_kwargs: Optional[dict] = None  # constructor overrides on top of the preset
        generator_checkpoint_path: Optional[str] = None  # weights to start from; None: random init
        mse_weight: float = 1.0
        l1_weight: float = 0.0
        vq_weight: float = 1.0  # on the model's codebook + 0.25 · commitment loss
        # Share of samples whose decoder input is the code rather than the encoder's output. Upstream's Stage A
        # trains with the quantizer, but Stage B is trained on, and generates, unquantized latents, which reach
        # the decoder directly: half and half teaches both. It costs nothing (one forward yields both), and the
        # VQ loss still ties encoder and codebook together on every sample.
        quantize_p: float = 0.5
        adversarial_weight: float = 0.0  # > 0: a hinge-loss PatchGAN trains alongside
        adversarial_start: int = 0  # updates before the discriminator (and its loss) comes in
        discriminator_c_hidden: int = 64
        discriminator_layers: int = 3  # stride-2 convs: patches of about 2^(layers+1) pixels
        discriminator_betas: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.9])  # taming's GAN Adam
        # Normalise the latents with the encoder's BatchNorm statistics as stored (its affine still trains) instead
        # of each batch's: batch statistics make a sample's latent depend on its batch-mates, which at small
        # batches costs more than the normalisation gives (4 dB PSNR at batch 8 on the demo scenes). Also the
        # choice for fine-tuning the released model on small batches.
        freeze_batchnorm: bool = False
        latent_std_decay: float = 0.99  # of the running latent std behind the saved scale_factor
        sample_batch_size: int = 4  # images per sample grid

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.quantize_p <= 1:
                raise ConfigError(f"quantize_p must lie in [0, 1], got {self.quantize_p}")
            for name in ("mse_weight", "l1_weight", "vq_weight", "adversarial_weight"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
            if not 0 <= self.latent_std_decay < 1:
                raise ConfigError(f"latent_std_decay must lie in [0, 1), got {self.latent_std_decay}")
            if len(self.discriminator_betas) != 2:
                raise ConfigError(f"discriminator_betas must be two numbers, got {self.discriminator_betas}")

    @dataclasses.dataclass
    class Models(WarpCore.Models):
        generator: nn.Module = None
        generator_ema: nn.Module = None
        discriminator: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):
        generator: Any = None
        discriminator: Any = None

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        generator: Any = None
        discriminator: Any = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_std = LatentStd(self.config.latent_std_decay)
        self._metrics = []  # per micro-batch of the current update

    # ---------------------------------------------------------------------------------------------- set-up
    def adversarial(self) -> bool:
        return self.config.adversarial_weight > 0

    def trained_models(self) -> list:
        return ["generator", "discriminator"] if self.adversarial() else ["generator"]

    def setup_models(self, extras):
        cfg = self.config
        if cfg.generator_checkpoint_path is not None:
            generator = load_model(cfg.generator_checkpoint_path, kind="stage_a", preset=cfg.model_version,
                                   kwargs=cfg.model_kwargs or {}, dtype=self.dtype())
        else:
            generator = build_model("stage_a", cfg.model_version, dtype=self.dtype(), **(cfg.model_kwargs or {}))
            # Upstream's codebook init (uniform ±1/k) puts every code near the origin, while the BatchNorm before
            # the quantizer standardises the latents: a handful of codes would win every vector. Unit-Gaussian
            # codes cover standardised latents from the start.
            with torch.no_grad():
                generator.vquantizer.codebook.weight.normal_()
        generator = generator.to(self.device)
        if cfg.freeze_batchnorm:
            for module in generator.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.register_forward_pre_hook(stored_statistics)
        if not cfg.training:
            return self.Models(generator=generator.eval().requires_grad_(False))
        generator.train().requires_grad_(True)
        ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.use_ema else None
        generator = self.parallelize(generator, (ResBlock,))
        if ema is not None and cfg.use_fsdp and self.env.is_distributed:  # sharded like the generator it follows
            ema = distributed.wrap(ema, self.env, self.device, True, (ResBlock,), self.autocast_dtype())
        discriminator = None
        if self.adversarial():
            discriminator = PatchDiscriminator(cfg.discriminator_c_hidden, cfg.discriminator_layers)
            discriminator = self.parallelize(discriminator.to(self.device, self.dtype()))
        return self.Models(generator=generator, generator_ema=ema, discriminator=discriminator)

    def setup_optimizers(self, extras, models):
        optimizers = super().setup_optimizers(extras, models)
        if models.discriminator is not None:
            cfg = self.config
            optimizers.discriminator = torch.optim.AdamW(models.discriminator.parameters(), lr=cfg.lr,
                                                         betas=tuple(cfg.discriminator_betas),
                                                         weight_decay=cfg.weight_decay)
        return optimizers

    # ---------------------------------------------------------------------------------------------- training
    def forward_pass(self, batch, extras, models):
        cfg = self.config
        images = batch["images"].to(self.device, self.dtype())
        generators = self.sample_generators(len(images))
        use_code = (rand_per_sample(generators) < cfg.quantize_p).to(self.device)
        with quantizer_tap(distributed.unwrap(models.generator), use_code) as tap:
            recon, vq_loss = models.generator(images, quantize=True)
        error = recon.float() - images.float()
        mse, l1 = error.square().mean(dim=[1, 2, 3]), error.abs().mean(dim=[1, 2, 3])
        loss = cfg.mse_weight * mse + cfg.l1_weight * l1 + cfg.vq_weight * vq_loss.float()
        with torch.no_grad():
            clamped_mse = (recon.detach().float().clamp(0, 1) - images.float()).square().mean(dim=[1, 2, 3])
            codes = distributed.unwrap(models.generator).codebook_size
            metrics = {"mse": mse.mean(), "l1": l1.mean(), "vq_loss": vq_loss.float(),
                       "psnr": (-10 * torch.log10(clamped_mse.clamp_min(1e-10))).mean(),
                       "codebook_usage": torch.tensor(tap.indices.unique().numel() / codes)}
        disc_loss = torch.zeros((), device=self.device)
        if self.adversarial() and self.info.total_steps >= cfg.adversarial_start:
            with frozen(distributed.unwrap(models.discriminator)) as judge:  # the generator's view of the judge
                gen_adv = -judge(recon).float().mean(dim=[1, 2, 3])
            loss = loss + cfg.adversarial_weight * gen_adv
            logits_real, logits_fake = models.discriminator(torch.cat([images, recon.detach().to(images.dtype)]))\
                .float().chunk(2)
            disc_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())  # hinge
            metrics.update(gen_adv_loss=gen_adv.mean(), disc_loss=disc_loss, disc_real=logits_real.mean(),
                           disc_fake=logits_fake.mean())
        self.latent_std.update(tap.latents)
        self._metrics.append({k: v.detach().float().cpu() for k, v in metrics.items()})
        return loss, (loss.mean() + disc_loss) / cfg.grad_accum_steps

    def update_metrics(self) -> dict:
        """Means over the update's micro-batches and processes: mse, l1, vq_loss, psnr (dB, of the reconstruction
        clamped to [0, 1]), codebook_usage (share of the codebook a micro-batch uses), the discriminator's
        losses and mean logits once it is on, and latent_std (the running estimate the saved scale_factor gets)."""
        collected, self._metrics = self._metrics, []
        out = {}
        if collected:  # the same names in every micro-batch of an update
            names = list(collected[0])
            means = torch.stack([torch.stack([m[k] for m in collected]).mean() for k in names]).to(self.device)
            out = dict(zip(names, (distributed.all_reduce(means) / self.env.world_size).tolist()))
        std = self.latent_std.value()
        return {**out, "latent_std": float("nan") if std is None else std}

    def training_states(self, data, extras, optimizers, schedulers) -> tuple:
        states, rank_states = super().training_states(data, extras, optimizers, schedulers)
        states["latent_std"] = self.latent_std  # equal on all ranks: its update pools them
        return states, rank_states

    def checkpoint_metadata(self, models) -> dict:
        """Stage A (and its EMA) saved with `scale_factor` = the running std of the unscaled latents, so that
        `core.weights.load_model` rebuilds a model whose latents have unit std. The EMA gets the online model's
        estimate: the two encoders differ by the EMA's lag only. The weights are unaffected (decode undoes the
        scale), which is why the model in training keeps its own."""
        meta = super().checkpoint_metadata(models)
        std = self.latent_std.value()
        if std is None or std == 0:
            return meta
        for name in ("generator", "generator_ema"):
            if name in meta:
                model = distributed.unwrap(getattr(models, name))
                spec = model.build_spec
                meta[name] = model_metadata(model, preset=spec["preset"],
                                            kwargs={**spec["kwargs"], "scale_factor": std})
        return meta

    def sample(self, batch, extras, models):
        """Rows: inputs, then per model (the generator, its EMA) reconstructions through the code and without it."""
        images = batch["images"][:self.config.sample_batch_size].to(self.device, self.dtype())
        rows = [images]
        for model in (models.generator, models.generator_ema):
            if model is not None:
                rows += [model(images, quantize=True)[0], model(images, quantize=False)[0]]
        rows = [r.float().clamp(0, 1).cpu() for r in rows]
        return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)


if __name__ == "__main__":
    main(WurstCoreA)
