"""What the Stage B and Stage C trainers share (upstream's train/base.py): data and text conditioning
(`DataCore`), and diffusion training with GDF (`TrainingCore`). A trainer adds its models and conditions."""
import argparse
import copy
import dataclasses
import os
import shutil
import sys
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from core import distributed
from core.conditioning import build_tokenizer, encode_text, load_text_encoder, random_text_encoder, tiny_text_config
from core.config import EXPECTED, EXPECTED_TRAIN, Config, ConfigError
from core.warpcore import WarpCore
from modules.common import AttnBlock, FeedForwardBlock, ResBlock, TimestepBlock
from modules.gdf import (GDF, AdaptiveLossWeight, ConstantLossWeight, CosineSchedule, CosineTNoiseCond,
                         EpsilonTarget, P2LossWeight, VPScaler, VTarget, X0Target)
from modules.gdf.noise import rand_per_sample, randn
from modules.presets import PRESETS, TINY_CLIP_TEXT_DIM, TINY_CLIP_TEXT_POOLED_DIM, build_model

TINY = "tiny"  # model_version / encoder name for the small random models of the tiny configs and the tests
PRESETS_WITH_TINY = {kind for kind, presets in PRESETS.items() if TINY in presets}
EFFNET_STRIDE = 32  # the EfficientNet encoder's downsampling
# FSDP units and activation-checkpointing units of Stage B and C (SPEC §5)
BLOCK_CLASSES = (ResBlock, AttnBlock, TimestepBlock, FeedForwardBlock)
TARGETS = {"epsilon": EpsilonTarget, "v": VTarget, "x0": X0Target}


def effnet_input_size(size, scale: float) -> list:
    """(h, w) scaled by `scale`, rounded down to multiples of the encoder's stride (at least one stride each)."""
    return [max(EFFNET_STRIDE, int(s * scale) // EFFNET_STRIDE * EFFNET_STRIDE) for s in size]


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """The training data (core.data): webdataset shards, filters, captions, aspect-ratio buckets."""
    webdataset_path: Union[str, list[str]] = EXPECTED_TRAIN
    # shards of the frozen encoders' outputs for these images (`train/train_x.py config --write-cache DIR`): when
    # set, training reads them instead of encoding images every step
    cached_webdataset_path: Optional[Union[str, list[str]]] = None
    image_size: int = EXPECTED_TRAIN
    multi_aspect_ratio: Optional[list[Union[str, float]]] = None  # None: square crops
    captions_getter: Optional[list[str]] = None  # [entry, getter name]; None: ['txt', 'identity']
    dataset_filters: Optional[list[Any]] = None  # [[key, 'lambda x: x > 1'], ...], parsed, never evaluated
    bucketeer_random_ratio: float = 0.05  # share of samples put in a random aspect-ratio bucket
    caption_dropout: float = 0.05  # share of captions replaced by "" (the unconditional input)
    crop: Literal["smart", "center", "random"] = "smart"
    num_workers: int = 2  # DataLoader workers per process
    shuffle_buffer: int = 690

    def __post_init__(self):
        super().__post_init__()
        from core.data import parse_captions_getter, parse_filters
        try:
            parse_filters(self.dataset_filters)
            parse_captions_getter(self.captions_getter)
        except ValueError as error:
            raise ConfigError(str(error)) from None


class DataCore(WarpCore):
    """Batches of images and captions from webdataset shards, and the text encoder that turns captions into
    conditions (core.conditioning, the same code inference uses)."""

    @dataclasses.dataclass(frozen=True)
    class Config(WarpCore.Config, DataConfig):
        # a folder with a CLIPTextModelWithProjection (`bash models/download_models.sh clip`), or 'tiny'
        clip_text_model_name: str = "models/text_encoder"

    @dataclasses.dataclass
    class Models(WarpCore.Models):
        tokenizer: Any = None
        text_model: nn.Module = None

    def setup_data(self, extras):
        from core.data import build_cached_dataloader
        cfg = self.config
        batch_size = cfg.micro_batch_size(self.env.world_size)
        placement = dict(shuffle_buffer=cfg.shuffle_buffer, pin_memory=self.device.type == "cuda",
                         rank=self.env.rank, world_size=self.env.world_size)
        if cfg.cached_webdataset_path:  # the frozen encoders' outputs (`--write-cache`); caption dropout: see below
            loader = build_cached_dataloader(cfg.cached_webdataset_path, batch_size, tensors=self.CACHED_TENSORS,
                                             num_workers=cfg.num_workers, seed=cfg.seed, **placement)
        else:
            loader = self.image_loader(batch_size, caption_dropout=cfg.caption_dropout,
                                       p_random_ratio=cfg.bucketeer_random_ratio, **placement)
        return self.Data(dataset=loader.stream, dataloader=loader, iterator=iter(loader))

    def image_loader(self, batch_size, **settings):
        """`core.data.build_dataloader` over `webdataset_path` with the config's sizes, captions, filters and crop
        (what training and `write_cache` must agree on); `settings` add the rest."""
        from core.data import build_dataloader
        cfg = self.config
        return build_dataloader(cfg.webdataset_path, batch_size, image_size=cfg.image_size,
                                multi_aspect_ratio=cfg.multi_aspect_ratio, captions_getter=cfg.captions_getter,
                                dataset_filters=cfg.dataset_filters, crop=cfg.crop, num_workers=cfg.num_workers,
                                seed=cfg.seed, **settings)

    def data_metrics(self, data) -> dict:
        """Samples the data pipeline skipped so far (counted per finished epoch)."""
        stats = data.dataloader.stats
        return {"corrupt_samples": float(stats["corrupt"]), "filtered_samples": float(stats["filtered"])}

    def setup_text_model(self):
        """(tokenizer, frozen text encoder); 'tiny' builds a small random one that fits the tiny presets."""
        name = self.config.clip_text_model_name
        if name == TINY:
            config = tiny_text_config(hidden=TINY_CLIP_TEXT_DIM, projection=TINY_CLIP_TEXT_POOLED_DIM)
            text_model = random_text_encoder(config, seed=self.config.seed).to(self.device, self.dtype())
            return build_tokenizer(), text_model
        return build_tokenizer(name), load_text_encoder(name, dtype=self.dtype(), device=self.device)

    CACHED_TENSORS: tuple = ()  # what `--write-cache` stores per sample and a cached run reads instead of images

    def text_conditions(self, batch, models, is_unconditional=False, generators=None) -> dict:
        """{'clip_text', 'clip_text_pooled'} of the batch's captions ("" for the unconditional branch).

        A cached batch carries them; its caption dropout happens here (`caption_dropout` of the rows, drawn from
        the per-sample `generators` in training), replacing rows by the embeddings of "" exactly as the image
        pipeline's dropped captions would be encoded.
        """
        captions = batch["captions"]
        if is_unconditional:
            captions = [""] * len(captions)
        elif "clip_text_pooled" in batch:  # cached (Stage B caches the pooled embedding only)
            cond = {k: batch[k].to(self.device) for k in ("clip_text", "clip_text_pooled") if k in batch}
            if generators is not None and self.config.caption_dropout > 0:
                drop = rand_per_sample(generators) < self.config.caption_dropout
                if drop.any():
                    empty = self._empty_caption(models)
                    for k, v in cond.items():
                        v[drop.to(v.device)] = empty[k].to(v.dtype).squeeze(0)
            return cond
        return encode_text(models.text_model, models.tokenizer, captions, device=self.device)

    def _empty_caption(self, models) -> dict:
        """The frozen text encoder's conditions for "" (every dropped row's), computed once."""
        if getattr(self, "_empty_text", None) is None:
            self._empty_text = encode_text(models.text_model, models.tokenizer, [""], device=self.device)
        return self._empty_text

    def cache_tensors(self, batch, models) -> dict:
        """{name: B×...} for CACHED_TENSORS from an image batch: what the frozen encoders make of it."""
        raise NotImplementedError(f"{type(self).__name__} has no cached training mode")

    def unfreeze_mapper(self, effnet):
        """`train_effnet_mapper` (Stage B's and the Previewer's setting): the encoder's mapper learns with the model
        while its backbone stays frozen; in one process only, as nothing synchronises the mapper across ranks."""
        if not self.config.train_effnet_mapper:
            return effnet
        if self.env.is_distributed:
            raise ConfigError("train_effnet_mapper runs in one process (the mapper is not synchronised across ranks)")
        if self.config.training:
            effnet.mapper.requires_grad_(True)
        return effnet

    @torch.no_grad()
    def write_cache(self, out_dir, maxcount=1000) -> list:
        """One pass over `webdataset_path` (no shuffling, no caption dropout, every sample) through the frozen
        encoders into shards under `out_dir`; point `cached_webdataset_path` at them. Returns the shard paths.

        The shards are written into `out_dir.incomplete` and that folder is renamed to `out_dir` when the pass is
        complete, so a killed run never leaves a folder of partial shards that training would read as the cache.
        """
        from core.data import cache_to_shards
        out_dir = os.path.normpath(out_dir)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise ConfigError(f"--write-cache {out_dir}: that folder already holds files; remove it or name a new one "
                              "(a cache is written whole, never added to)")
        tmp = out_dir + ".incomplete"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        models = self.setup_models(self.setup_extras_pre())
        loader = self.image_loader(self.config.micro_batch_size(1), shuffle_buffer=0, drop_last=False)
        os.makedirs(tmp)
        paths = cache_to_shards(loader.iter_epoch(), lambda batch: self.cache_tensors(batch, models),
                                os.path.join(tmp, "shard-%06d.tar"), maxcount)
        os.replace(tmp, out_dir)  # rename(2) also replaces an empty folder
        return [os.path.join(out_dir, os.path.basename(p)) for p in paths]


class TrainingCore(DataCore):
    """Diffusion training with GDF, shared by Stage B and Stage C: a frozen encoder makes the latents, the generator
    learns to denoise them (per-sample MSE × loss weight), and sample grids show its progress.

    A trainer defines `setup_models`, `get_conditions`, `encode_latents`, `decode_latents` and, optionally,
    `noise` (the training noise).
    """
    SAMPLING_DEFAULTS = {}  # a trainer's GDF.sample arguments for its sample grids
    # What a trainer trains instead of the generator (e.g. "a ControlNet"): then the generator is loaded frozen and
    # in eval mode, also while training (upstream forgets both, SPEC §7), with no EMA and no DDP/FSDP wrapper.
    FROZEN_GENERATOR_FOR: Optional[str] = None

    @dataclasses.dataclass(frozen=True)
    class Config(DataCore.Config):
        model_version: str = EXPECTED  # a modules.presets name: '3.6B', '1B', '3B', '700M' or 'tiny'
        model_kwargs: Optional[dict] = None  # constructor overrides on top of the preset
        generator_checkpoint_path: Optional[str] = None  # weights to start from; None: random init
        adaptive_loss_weight: Optional[bool] = None  # AdaptiveLossWeight instead of `loss_weight`
        # P2 (upstream) weighs an epsilon objective's x0 errors by a², all but ignoring high noise, where the conditions
        # matter most; with `gdf_target: v`, constant weights weigh x0 errors by 1/b²: every noise level counts.
        loss_weight: Literal["p2", "constant"] = "p2"
        gdf_target: Literal["epsilon", "v", "x0"] = "epsilon"  # what the generator predicts
        # Training noise-schedule shift (GDF's `shift`, as at sampling): logSNR - 2·log(shift), so more updates at
        # high noise, where the layout is decided; the loss weight stays that of the unshifted level. Larger latent
        # grids keep their layout at a given noise level longer and need it (upstream samples 24×24 with shift 2).
        train_shift: float = 1.0
        # Share of the samples trained at t = 1, the schedule's clamped top, where sampling starts from pure noise.
        # Only there does the latent hide the layout, so only there must the model read it from the text. Uniform t
        # puts ~3% of the samples there (train_shift 4); the demo's 16×16 Stage C then learnt colour, but not place.
        top_noise_share: float = 0.0
        sampling_configs: Optional[dict] = None  # overrides of the trainer's sampling settings for sample grids
        sample_batch_size: int = 4  # images per sample grid

        REPLACED = {"edm_objective": "upstream's trainers never read it; for a v-prediction objective set "
                                     "`gdf_target: v` (modules.gdf.VTarget)"}

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.top_noise_share <= 1:
                raise ConfigError(f"top_noise_share is a share of the samples, from 0 to 1, not {self.top_noise_share}")

    @dataclasses.dataclass
    class Models(DataCore.Models):
        generator: nn.Module = None
        generator_ema: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):
        generator: Any = None

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        generator: Any = None

    @dataclasses.dataclass
    class Extras(WarpCore.Extras):
        gdf: GDF = None
        sampling_configs: dict = None

    # ------------------------------------------------------------------------------------------ trainer hooks
    def get_conditions(self, batch, models, extras, is_eval=False, is_unconditional=False, eval_image_embeds=False,
                       generators=None) -> dict:
        """The generator's keyword inputs. In training (`is_eval` False) random choices use `generators`."""
        raise NotImplementedError

    def encode_latents(self, batch, models, extras) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, latents, batch, models, extras) -> torch.Tensor:
        raise NotImplementedError

    def training_target(self, batch, models, noised, noise_cond, conditions, target) -> tuple:
        """(what the generator learns to predict for the noised batch, a per-sample loss multiplier or None): the
        objective's target from the data, every sample weighed alike."""
        return target, None

    def noise(self, latents, generators) -> torch.Tensor:
        """The training noise for `latents`, one generator per sample."""
        return randn(latents.shape, generators, latents.device, latents.dtype)

    # ---------------------------------------------------------------------------------------------- set-up
    def setup_extras_pre(self):
        gdf = GDF(
            schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]),
            input_scaler=VPScaler(), target=TARGETS[self.config.gdf_target](),
            noise_cond=CosineTNoiseCond(),
            loss_weight=AdaptiveLossWeight() if self.config.adaptive_loss_weight else
            ConstantLossWeight() if self.config.loss_weight == "constant" else P2LossWeight(),
        )
        sampling = {**self.SAMPLING_DEFAULTS, **(self.config.sampling_configs or {})}
        return self.Extras(gdf=gdf, sampling_configs=sampling)

    def load_frozen(self, kind: str, path: Optional[str], fresh_ok: bool = False) -> nn.Module:
        """A frozen helper model (encoder, previewer) from its checkpoint, as the kind the file records (e.g. the
        demo's 'effnet_lite0' where an EfficientNet is asked for); without a file a new one, for the tiny configs
        (random) or when `fresh_ok` (a model that trains here, e.g. an encoder's mapper)."""
        from core.weights import load_model, recorded_kind
        if path is not None:
            kind = recorded_kind(path, kind)
        preset = TINY if self.config.model_version == TINY and kind in PRESETS_WITH_TINY else None
        if path is None:
            if self.config.model_version != TINY and not fresh_ok:
                raise ConfigError(f"no checkpoint for the {kind} model: set its *_checkpoint_path")
            model = build_model(kind, preset)
        else:
            model = load_model(path, kind=kind, preset=preset, dtype=self.dtype())
        return model.to(self.device, self.dtype()).eval().requires_grad_(False)

    def setup_generator(self, kind: str) -> tuple:
        """(generator, its EMA copy or None), from `generator_checkpoint_path` or freshly initialised, then
        activation-checkpointed and wrapped for DDP/FSDP as configured."""
        from core.weights import load_model, recorded_target
        cfg = self.config
        frozen = self.FROZEN_GENERATOR_FOR
        if cfg.generator_checkpoint_path is not None:
            target = recorded_target(cfg.generator_checkpoint_path)
            if frozen and target != cfg.gdf_target:  # it would learn to turn the frozen model's output into another
                raise ConfigError(f"{cfg.generator_checkpoint_path} predicts {target}, but gdf_target is "
                                  f"{cfg.gdf_target}: {frozen} trains against its frozen Stage C's objective, "
                                  f"so set gdf_target: {target}")
            generator = load_model(cfg.generator_checkpoint_path, kind=kind, preset=cfg.model_version,
                                   kwargs=cfg.model_kwargs or {}, dtype=self.dtype())
        elif frozen and cfg.model_version != TINY:
            raise ConfigError(f"{frozen} is trained for a trained Stage C: set generator_checkpoint_path")
        else:
            generator = build_model(kind, cfg.model_version, dtype=self.dtype(), **(cfg.model_kwargs or {}))
        generator = generator.to(self.device)
        if not cfg.training or frozen:
            return generator.eval().requires_grad_(False), None
        generator.requires_grad_(True)
        ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.use_ema else None
        generator = self.parallelize(generator, BLOCK_CLASSES)
        if ema is not None and cfg.use_fsdp and self.env.is_distributed:  # sharded like the generator it follows
            ema = distributed.wrap(ema, self.env, self.device, True, BLOCK_CLASSES, self.autocast_dtype())
        return generator, ema

    # ---------------------------------------------------------------------------------------------- training
    def forward_pass(self, batch, extras, models):
        generators = self.sample_generators(len(batch["captions"]))
        with torch.no_grad():
            conditions = self.get_conditions(batch, models, extras, generators=generators)
            latents = self.encode_latents(batch, models, extras)
            epsilon = self.noise(latents, generators)
            t = rand_per_sample(generators)
            if self.config.top_noise_share > 0:  # one more draw per sample: its stream is unchanged without it
                top = rand_per_sample(generators) < self.config.top_noise_share
                t = t.masked_fill(top, 1.0)
            noised, _, target, logSNR, noise_cond, loss_weight = extras.gdf.diffuse(
                latents, epsilon=epsilon, t=t, shift=self.config.train_shift, loss_shift=self.config.train_shift,
                generator=generators)
        target, sample_weight = self.training_target(batch, models, noised, noise_cond, conditions, target)
        if sample_weight is not None:
            loss_weight = loss_weight * sample_weight.to(loss_weight)
        pred = models.generator(noised, noise_cond, **conditions)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        loss_adjusted = (loss * loss_weight).mean() / self.config.grad_accum_steps
        if isinstance(extras.gdf.loss_weight, AdaptiveLossWeight):  # the same buckets in every process
            extras.gdf.loss_weight.update_buckets(distributed.all_gather(logSNR.float()),
                                                  distributed.all_gather(loss.detach()))
        return loss, loss_adjusted

    def training_states(self, data, extras, optimizers, schedulers) -> tuple:
        states, rank_states = super().training_states(data, extras, optimizers, schedulers)
        if isinstance(extras.gdf.loss_weight, AdaptiveLossWeight):
            states["adaptive_loss_weight"] = extras.gdf.loss_weight
        return states, rank_states

    def checkpoint_metadata(self, models) -> dict:
        """Each saved model also records the objective it was trained with (what inference must sample with)."""
        return {name: {**meta, "gdf_target": self.config.gdf_target}
                for name, meta in super().checkpoint_metadata(models).items()}

    def sample(self, batch, extras, models):
        """Rows: inputs, noised latents, one-step predictions, samples, and samples of the EMA model."""
        n = min(len(batch["captions"]), self.config.sample_batch_size)
        batch = {k: v[:n] for k, v in batch.items()}
        conditions = self.get_conditions(batch, models, extras, is_eval=True)
        unconditions = self.get_conditions(batch, models, extras, is_eval=True, is_unconditional=True)
        latents = self.encode_latents(batch, models, extras)
        noised, _, _, logSNR, noise_cond, _ = extras.gdf.diffuse(latents)
        pred = extras.gdf.undiffuse(noised, logSNR, models.generator(noised, noise_cond, **conditions))[0]
        rows = [noised, pred]
        for model in (models.generator, models.generator_ema):
            if model is not None:
                *_, (sampled, _, _) = extras.gdf.sample(model, conditions, latents.shape, unconditions,
                                                        device=self.device, **extras.sampling_configs)
                rows.append(sampled)
        rows = [self.decode_latents(r, batch, models, extras).float().cpu() for r in rows]
        if "images" in batch:  # a cached batch has none
            images = F.interpolate(batch["images"].float(), size=rows[0].shape[-2:], mode="bicubic",
                                   align_corners=False)
            rows.insert(0, images.clamp(0, 1))
        return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)


def main(core_class, argv=None):
    """`python train/train_<x>.py config.yaml [key=value ...]`, alone or under torchrun/SLURM."""
    parser = argparse.ArgumentParser(description=core_class.__doc__)
    parser.add_argument("config", help="training config (.yaml/.yml/.json)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the config's")
    parser.add_argument("--write-cache", metavar="DIR", help="instead of training, run the frozen encoders once over "
                        "webdataset_path and write their outputs as shards to DIR (then train with "
                        "cached_webdataset_path=DIR)")
    args = parser.parse_args(argv)
    try:
        core = core_class(config_file_path=args.config, overrides=args.overrides)
        if args.write_cache:
            paths = core.write_cache(args.write_cache)
            print(f"wrote {len(paths)} cache shard(s) to {args.write_cache}")
            return
        core()
    except ConfigError as e:  # a setting to fix, said in one line rather than under a traceback
        sys.exit(f"{os.path.basename(sys.argv[0])}: {e}")
