"""WarpCore: the base of every trainer. It owns the set-up order and the training loop; a task only fills hooks.

Set-up order as upstream: config, info (in the constructor), then on call: extras (pre), data, models, optimizers,
schedulers, extras (post); then the latest checkpoint is restored and the loop runs. The loop does gradient
accumulation (no gradient sync but on the last micro-batch), clipping, AdamW with warm-up, EMA, skipping of
non-finite losses or gradients, checkpoints, sample grids and logs. Hooks a task fills: `setup_data`,
`setup_models`, `forward_pass`, and optionally `setup_extras_pre/post`, `setup_optimizers`, `setup_schedulers`,
`sample`, `trained_models`, `training_states`, `update_metrics`, `data_metrics`, `checkpoint_metadata`.
"""
import dataclasses
import functools
import json
import math
import os
from typing import Literal, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint_manager import CheckpointConfig, CheckpointManager, RNGState
from .config import EXPECTED_TRAIN, Config, ConfigError
from .distributed import DistributedConfig
from .ema import EMAConfig, update_ema
from .metrics import MetricLogger, MetricsConfig
from .weights import model_metadata

DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class TrainingConfig(Config):
    """What the loop itself reads; components add their own (checkpoints, EMA, distribution, logging)."""
    experiment_id: str = EXPECTED_TRAIN
    checkpoint_path: str = EXPECTED_TRAIN  # checkpoints go to <checkpoint_path>/<experiment_id>/
    output_path: str = EXPECTED_TRAIN  # logs and sample grids go to <output_path>/<experiment_id>/
    seed: int = 42
    dtype: Optional[DType] = None  # weights of the models; None: float32
    autocast_dtype: Optional[DType] = "bfloat16"  # mixed precision on accelerators; the CPU computes in `dtype`
    allow_tf32: bool = True

    lr: float = EXPECTED_TRAIN
    weight_decay: float = 0.01  # AdamW's default
    grad_clip: float = 1.0  # max gradient norm
    batch_size: int = EXPECTED_TRAIN  # per update, over all processes and accumulation steps
    grad_accum_steps: int = EXPECTED_TRAIN
    updates: int = EXPECTED_TRAIN
    warmup_updates: int = EXPECTED_TRAIN  # linear warm-up from 0 (warmup-scheduler's GradualWarmupScheduler)
    # after the warm-up: 'constant' (upstream's) or 'cosine', a half cosine from `lr` down to 0 at `updates`; short
    # runs (the demo's) end sharper when the step size shrinks than when an EMA averages a constant one
    lr_schedule: Literal["constant", "cosine"] = "constant"
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass
    sample_every: Optional[int] = None  # updates between sample grids; None: with every checkpoint; 0: never

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "grad_accum_steps", "updates"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")

    def micro_batch_size(self, world_size: int) -> int:
        """Samples per process and micro-batch; `batch_size` must split evenly."""
        per, rest = divmod(self.batch_size, world_size * self.grad_accum_steps)
        if rest or not per:
            raise ConfigError(f"batch_size {self.batch_size} does not split into {world_size} process(es) x "
                              f"{self.grad_accum_steps} accumulation step(s)")
        return per


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The factor on `lr` before update `step` + 1: step/warmup during the warm-up (as GradualWarmupScheduler),
    then a half cosine that reaches 0 after update `total`."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))


class Bag:
    """A dataclass of named parts (models, optimizers, ...), as in upstream's notebooks: `Models(**d)`, `.to_dict()`."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class WarpCore:
    @dataclasses.dataclass(frozen=True)
    class Config(TrainingConfig, CheckpointConfig, EMAConfig, DistributedConfig, MetricsConfig):
        pass

    @dataclasses.dataclass
    class Info:
        """Progress that survives restarts (saved as info.json)."""
        total_steps: int = 0  # optimizer updates done
        iter: int = 0  # micro-batches done
        skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
        ema_loss: Optional[float] = None
        wandb_run_id: Optional[str] = None

    @dataclasses.dataclass
    class Data(Bag):
        dataset: object = None
        dataloader: object = None
        iterator: object = None  # yields the batches
        # dataloader.state_dict(), when it has one, is the data position a checkpoint keeps

    @dataclasses.dataclass
    class Models(Bag):
        pass

    @dataclasses.dataclass
    class Optimizers(Bag):
        pass

    @dataclasses.dataclass
    class Schedulers(Bag):
        pass

    @dataclasses.dataclass
    class Extras(Bag):
        pass

    def __init__(self, config_file_path: Optional[str] = None, config_dict: Optional[dict] = None, device=None,
                 training: bool = True, overrides=()):
        self.env = distributed.env_from(os.environ)
        self.device = torch.device(device) if device is not None else distributed.default_device(self.env)
        self.config = self.setup_config(config_file_path, config_dict, training, overrides)
        self.checkpoints = None
        self.logger = None
        if training:
            self.checkpoints = CheckpointManager(
                os.path.join(self.config.checkpoint_path, self.config.experiment_id), self.config, self.env)
        self.info = self.setup_info()

    # ----------------------------------------------------------------------------------------------- set-up
    def setup_config(self, config_file_path=None, config_dict=None, training=True, overrides=()):
        return self.Config.load(config_file_path, config_dict, overrides=overrides, training=training)

    def setup_info(self):
        """Progress of the latest checkpoint, or a fresh start."""
        latest = self.checkpoints.latest() if self.checkpoints else None
        if latest is None:
            return self.Info()
        names = {f.name for f in dataclasses.fields(self.Info)}
        return self.Info(**{k: v for k, v in self.checkpoints.read_info(latest).items() if k in names})

    def setup_extras_pre(self):
        return self.Extras()

    def setup_data(self, extras):
        raise NotImplementedError

    def setup_models(self, extras):
        raise NotImplementedError

    def setup_optimizers(self, extras, models):
        """AdamW over the trainable parameters of each trained model, named like the model."""
        cfg = self.config
        return self.Optimizers(**{
            name: torch.optim.AdamW([p for p in getattr(models, name).parameters() if p.requires_grad],
                                    lr=cfg.lr, weight_decay=cfg.weight_decay)
            for name in self.trained_models()})

    def setup_schedulers(self, extras, models, optimizers):
        """Linear warm-up over `warmup_updates` for each optimizer (none when 0 and the schedule is constant), then
        the `lr_schedule`."""
        from warmup_scheduler import GradualWarmupScheduler
        cfg = self.config
        if cfg.lr_schedule == "cosine":
            return self.Schedulers(**{
                name: torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
                    warmup_cosine, warmup=cfg.warmup_updates, total=cfg.updates))
                for name, opt in optimizers.to_dict().items() if opt is not None})
        if cfg.warmup_updates == 0:
            return self.Schedulers()
        return self.Schedulers(**{
            name: GradualWarmupScheduler(opt, multiplier=1, total_epoch=cfg.warmup_updates)
            for name, opt in optimizers.to_dict().items() if opt is not None})

    def setup_extras_post(self, extras, models, optimizers, schedulers):
        return extras

    # --------------------------------------------------------------------------------------- training hooks
    def trained_models(self) -> list:
        """Names (fields of Models) of the models this task trains; `<name>_ema`, when set, is its EMA."""
        return ["generator"]

    def forward_pass(self, batch, extras, models):
        """Returns (per-sample loss, scalar loss to backpropagate, already divided by grad_accum_steps)."""
        raise NotImplementedError

    def sample(self, batch, extras, models) -> Optional[torch.Tensor]:
        """A 3×H×W image grid in [0,1] to save, or None. Runs on every rank, without gradients."""
        return None

    def training_states(self, data, extras, optimizers, schedulers) -> tuple:
        """(states equal on all ranks, per-rank states) that a checkpoint keeps besides models and optimizers."""
        states = {f"scheduler.{k}": s for k, s in schedulers.to_dict().items() if s is not None}
        rank_states = {"rng": RNGState()}
        if hasattr(data.dataloader, "state_dict"):
            rank_states["data"] = data.dataloader
        return states, rank_states

    def update_metrics(self) -> dict:
        """The task's own measurements of the update just done (beyond the loss), to log with it; a task that
        collects them in `forward_pass` averages them over micro-batches and processes here."""
        return {}

    def data_metrics(self, data) -> dict:
        """Data-pipeline counters to log with each update."""
        return {}

    def checkpoint_metadata(self, models) -> dict:
        """Safetensors metadata per saved model: how to rebuild it (core.weights.model_metadata)."""
        return {name: model_metadata(distributed.unwrap(model))
                for name, model in self._checkpointed_models(models).items()}

    # -------------------------------------------------------------------------------------------- helpers
    def parallelize(self, model: nn.Module, wrap_classes: tuple = ()) -> nn.Module:
        """Activation checkpointing (if configured) and DDP/FSDP (if distributed) for a model being trained."""
        if self.config.gradient_checkpointing:
            distributed.apply_activation_checkpointing(model, wrap_classes)
        param_dtype = self.autocast_dtype() if self.config.use_fsdp else None
        return distributed.wrap(model, self.env, self.device, self.config.use_fsdp, wrap_classes, param_dtype)

    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype or "float32")

    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The mixed-precision dtype, or None on the CPU (which trains in fp32) or when switched off."""
        if self.device.type == "cpu" or self.config.autocast_dtype is None:
            return None
        return getattr(torch, self.config.autocast_dtype)

    def autocast(self):
        dtype = self.autocast_dtype()
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def sample_generators(self, batch_size: int) -> list:
        """One generator per sample of the current micro-batch, seeded by the sample's place in the global stream.

        A sample's noise then depends neither on how the batch is split into micro-batches or processes nor
        on a restart: 2 × b accumulated equals one batch of 2b, and N processes equal one on their union.
        """
        first = (self.info.iter * self.env.world_size + self.env.rank) * batch_size
        base = (self.config.seed * 2**40) % 2**62
        return [torch.Generator().manual_seed(base + first + i) for i in range(batch_size)]

    # ---------------------------------------------------------------------------------------------- running
    def __call__(self):
        cfg = self.config
        if not cfg.training:
            raise RuntimeError("this core was built with training=False, which sets up models for inference only")
        distributed.init_process_group(self.env, self.device, cfg.dist_backend)
        if self.device.type == "cuda" and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        out_dir = os.path.join(cfg.output_path, cfg.experiment_id)
        self.logger = MetricLogger(cfg, out_dir, cfg.experiment_id, self.env.is_main,
                                   run_id=self.info.wandb_run_id, run_config=cfg.to_dict())
        self.info.wandb_run_id = self.logger.run_id
        self.logger.info(f"config: {json.dumps(cfg.to_dict(), default=str)}")
        self.logger.info(f"{self.env.world_size} process(es), device {self.device}")

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        extras = self.setup_extras_pre()
        data = self.setup_data(extras)
        models = self.setup_models(extras)
        optimizers = self.setup_optimizers(extras, models)
        schedulers = self.setup_schedulers(extras, models, optimizers)
        extras = self.setup_extras_post(extras, models, optimizers, schedulers)
        for name, model in models.to_dict().items():
            if isinstance(model, nn.Module):
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                self.logger.info(f"model {name}: {type(distributed.unwrap(model)).__name__}, {trainable} trainable")

        torch.manual_seed(cfg.seed + self.env.rank)  # different dropout and augmentation in each process
        latest = self.checkpoints.latest()
        if latest is not None:
            states, rank_states = self.training_states(data, extras, optimizers, schedulers)
            info = self.checkpoints.load(latest, self._checkpointed_models(models),
                                         self._optimizer_pairs(models, optimizers), states, rank_states)
            self.info = self.Info(**{f.name: info.get(f.name, getattr(self.info, f.name))
                                     for f in dataclasses.fields(self.Info)})
            self.logger.info(f"resumed from {latest} at update {self.info.total_steps}")
        try:
            self.train(data, extras, models, optimizers, schedulers)
        finally:
            self.logger.close()
        distributed.teardown()

    def train(self, data, extras, models, optimizers, schedulers):
        cfg = self.config
        trained = [getattr(models, name) for name in self.trained_models()]
        params = [p for m in trained for p in m.parameters() if p.requires_grad]
        optims = [o for o in optimizers.to_dict().values() if o is not None]
        scheds = [s for s in schedulers.to_dict().values() if s is not None]
        for model in trained:
            model.train()
        progress = tqdm(total=cfg.updates, initial=self.info.total_steps, disable=not self.env.is_main,
                        dynamic_ncols=True)
        while self.info.total_steps < cfg.updates:
            losses, finite = [], True
            for micro in range(cfg.grad_accum_steps):
                last = micro == cfg.grad_accum_steps - 1
                batch = next(data.iterator)
                with distributed.grad_sync(trained, enabled=last):
                    with self.autocast():
                        loss, loss_adjusted = self.forward_pass(batch, extras, models)
                    ok = self._all_finite(loss_adjusted)
                    if ok:
                        loss_adjusted.backward()
                finite = finite and ok
                losses.append(loss.detach().float().mean())
                if last:
                    metrics = self._update(params, optims, scheds, finite)
                self.info.iter += 1
                self._update_ema(models)
            loss_value = distributed.all_reduce(torch.stack(losses).mean()).item() / self.env.world_size
            if math.isfinite(loss_value):
                self.info.ema_loss = loss_value if self.info.ema_loss is None else \
                    self.info.ema_loss * 0.99 + loss_value * 0.01
            ema_loss = float("nan") if self.info.ema_loss is None else self.info.ema_loss
            metrics = {"loss": loss_value, "ema_loss": ema_loss, **metrics, **self.update_metrics(),
                       **self.data_metrics(data)}
            self.logger.log(self.info.total_steps, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{metrics['lr']:.2e}")
            self._after_update(batch, data, extras, models, optimizers, schedulers)
        progress.close()

    def _update(self, params, optims, scheds, finite: bool) -> dict:
        """Clip, step and zero the gradients; after a non-finite loss or gradient norm only zero them."""
        lr = optims[0].param_groups[0]["lr"] if optims else 0.0
        grad_norm = float("nan")
        if finite:
            norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            finite = math.isfinite(grad_norm)  # the same in every process: the norm is of the reduced gradients
        if finite:
            for opt in optims:
                opt.step()
            for sched in scheds:
                sched.step()
        else:
            self.info.skipped_steps += 1
            self.logger.warning(f"non-finite loss or gradient at update {self.info.total_steps + 1}: update skipped "
                                f"({self.info.skipped_steps} so far)")
        for opt in optims:
            opt.zero_grad(set_to_none=True)
        self.info.total_steps += 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped_steps": float(self.info.skipped_steps)}

    def _update_ema(self, models):
        beta = self.config.ema_beta_at(self.info.iter)
        if beta is None:
            return
        for name in self.trained_models():
            ema = getattr(models, f"{name}_ema", None)
            if ema is not None:
                update_ema(ema, getattr(models, name), beta)

    def _after_update(self, batch, data, extras, models, optimizers, schedulers):
        cfg, step = self.config, self.info.total_steps
        if self.checkpoints.due(step, cfg.updates):
            states, rank_states = self.training_states(data, extras, optimizers, schedulers)
            path = self.checkpoints.save(step, dataclasses.asdict(self.info), self._checkpointed_models(models),
                                         self._optimizer_pairs(models, optimizers), states, rank_states,
                                         metadata=self.checkpoint_metadata(models))
            self.logger.info(f"checkpoint written to {path}")
        sample_due = self.checkpoints.due(step, cfg.updates) if cfg.sample_every is None else \
            cfg.sample_every > 0 and step % cfg.sample_every == 0
        if sample_due:
            self._write_samples(batch, extras, models)

    def _write_samples(self, batch, extras, models):
        trained = [getattr(models, name) for name in self.trained_models()]
        for model in trained:
            model.eval()
        # Sampling draws from its own seeded RNG and leaves the training RNG untouched, so runs stay reproducible.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            with torch.no_grad(), self.autocast():
                grid = self.sample(batch, extras, models)
        for model in trained:
            model.train()
        if grid is not None and self.env.is_main:
            import torchvision
            path = os.path.join(self.config.output_path, self.config.experiment_id,
                                f"{self.info.total_steps:06d}.jpg")
            torchvision.utils.save_image(grid.float().clamp(0, 1), path)
            self.logger.log_image(self.info.total_steps, "samples", path)

    def _checkpointed_models(self, models) -> dict:
        out = {}
        for name in self.trained_models():
            out[name] = getattr(models, name)
            if getattr(models, f"{name}_ema", None) is not None:
                out[f"{name}_ema"] = getattr(models, f"{name}_ema")
        return out

    def _optimizer_pairs(self, models, optimizers) -> dict:
        return {name: (getattr(models, name), opt) for name, opt in optimizers.to_dict().items() if opt is not None}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite in every process (they must agree on skipping)."""
        flag = torch.isfinite(loss.detach()).all().float().reshape(1)
        return bool(distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN).item())
