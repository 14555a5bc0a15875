"""The training base (core.warpcore) on a toy regression task: accumulation, non-finite losses, EMA, checkpoints,
resuming, activation checkpointing, wandb and launcher detection."""
import copy
import dataclasses
import math
import os
import sys
import types

import pytest
import torch
from torch import nn

from core import distributed
from core.checkpoint_manager import CheckpointConfig, CheckpointManager
from core.ema import EMAConfig, update_ema
from core.metrics import read_log
from core.warpcore import WarpCore
from core.weights import load_state_dict_file


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, c), nn.Tanh())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.mlp(x)


class Stream:
    """Batch i of b samples, the same for any b split (sample k is drawn from its own seed)."""

    def __init__(self, b):
        self.b, self.i = b, 0

    def __iter__(self):
        return self

    def __next__(self):
        xs = [torch.randn(4, generator=torch.Generator().manual_seed(k)) for k in range(self.i, self.i + self.b)]
        self.i += self.b
        x = torch.stack(xs)
        return {"x": x, "y": torch.sin(x @ torch.linspace(-1, 1, 8).view(4, 2))}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


class ToyCore(WarpCore):
    nan_at_iter = None  # iteration whose loss is made NaN
    nan_grad_at_iter = None  # iteration whose loss is finite but its gradient is not

    @dataclasses.dataclass
    class Models(WarpCore.Models):
        generator: nn.Module = None
        generator_ema: nn.Module = None

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):
        generator: object = None

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        generator: object = None

    def setup_data(self, extras):
        stream = Stream(self.config.micro_batch_size(self.env.world_size))
        return self.Data(dataloader=stream, iterator=stream)

    def setup_models(self, extras):
        model = nn.Sequential(nn.Linear(4, 16), Block(16), Block(16), nn.Linear(16, 2))
        ema = copy.deepcopy(model).requires_grad_(False) if self.config.use_ema else None
        self.models = self.Models(generator=self.parallelize(model, (Block,)), generator_ema=ema)
        return self.models

    def forward_pass(self, batch, extras, models):
        loss = ((models.generator(batch["x"]) - batch["y"]) ** 2).mean(1)
        if self.info.iter == self.nan_at_iter:
            loss = loss * float("nan")
        if self.info.iter == self.nan_grad_at_iter:  # d sqrt(|x|)/dx at 0 is 0/0
            loss = loss + (models.generator[0].weight.sum() * 0).abs().sqrt()
        return loss, loss.mean() / self.config.grad_accum_steps


def toy_config(tmp_path, **changes):
    return {"experiment_id": "toy", "checkpoint_path": str(tmp_path / "ck"), "output_path": str(tmp_path / "out"),
            "lr": 1e-2, "batch_size": 8, "grad_accum_steps": 1, "updates": 6, "warmup_updates": 1, "save_every": 3,
            "backup_every": 100, **changes}


def run(tmp_path, core_class=ToyCore, **changes):
    core = core_class(config_dict=toy_config(tmp_path, **changes), device="cpu")
    core()
    return core


def weights(core):
    return {k: v.clone() for k, v in core.models.generator.state_dict().items()}


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path):
    full = run(tmp_path / "a", grad_accum_steps=1)
    halves = run(tmp_path / "b", grad_accum_steps=2)
    for k, v in weights(full).items():
        torch.testing.assert_close(weights(halves)[k], v, rtol=1e-5, atol=1e-6)
    assert halves.info.iter == 2 * full.info.iter == 12 and halves.info.total_steps == 6
    untrained = ToyCore(config_dict=toy_config(tmp_path / "c"), device="cpu")
    torch.manual_seed(42)
    initial = untrained.setup_models(None).generator.state_dict()
    assert any((initial[k] - v).abs().max() > 1e-3 for k, v in weights(full).items())  # it did train


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_skips_the_update_and_is_logged(tmp_path, kind):
    class NaNAt3(ToyCore):  # the 4th micro-batch: the second of update 2 (2 micro-batches per update)
        nan_at_iter = 3 if kind == "loss" else None
        nan_grad_at_iter = 3 if kind == "gradient" else None

    core = run(tmp_path, NaNAt3, grad_accum_steps=2, updates=3, save_every=1, backup_every=1)
    assert core.info.skipped_steps == 1 and core.info.total_steps == 3
    log = (tmp_path / "out" / "toy" / "log.txt").read_text()
    assert "non-finite loss or gradient at update 2: update skipped (1 so far)" in log
    metrics = read_log(tmp_path / "out" / "toy" / "log.txt")
    assert metrics[2]["skipped_steps"] == 1 and metrics[3]["grad_norm"] > 0
    step = [load_state_dict_file(tmp_path / "ck" / "toy" / f"step_{i:08d}" / "generator.safetensors")
            for i in (1, 2, 3)]
    assert all(torch.equal(step[1][k], v) for k, v in step[0].items())  # update 2 changed nothing
    assert any(not torch.equal(step[2][k], v) for k, v in step[1].items())  # update 3 trained again
    assert all(torch.isfinite(v).all() for v in step[2].values())


def test_ema_follows_upstream_schedule():
    cfg = EMAConfig(ema_start_iters=4, ema_iters=2, ema_beta=0.9)
    assert [cfg.ema_beta_at(i) for i in range(1, 8)] == [None, 0.0, None, 0.0, None, 0.9, None]
    ema, model = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = {k: 0.9 * v + 0.1 * model.state_dict()[k] for k, v in ema.state_dict().items()}
    update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema.state_dict(), expected)
    update_ema(ema, model, 0.0)
    torch.testing.assert_close(ema.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    settings = dict(grad_accum_steps=2, updates=8, save_every=2, ema_start_iters=3, ema_iters=2, ema_beta=0.8)
    straight = run(tmp_path / "a", **settings)
    first = run(tmp_path / "b", **{**settings, "updates": 5})  # stops at 5; the last checkpoint is also at 5
    assert first.info.total_steps == 5
    resumed = run(tmp_path / "b", **settings)
    log_a, log_b = (read_log(p / "out" / "toy" / "log.txt") for p in (tmp_path / "a", tmp_path / "b"))
    assert sorted(log_b) == list(range(1, 9))
    for step in range(1, 9):
        assert log_b[step]["loss"] == log_a[step]["loss"], step
    for k, v in weights(straight).items():
        assert torch.equal(weights(resumed)[k], v)
    for k, v in straight.models.generator_ema.state_dict().items():
        assert torch.equal(resumed.models.generator_ema.state_dict()[k], v)
    assert "resumed from" in (tmp_path / "b" / "out" / "toy" / "log.txt").read_text()


def test_cosine_schedule_warms_up_decays_to_zero_and_resumes_exactly(tmp_path):
    """lr_schedule: cosine — the logged lr of update k is lr·k/w during the warm-up, then lr·½(1+cos(π(k-w)/(n-w))),
    0 at the last update; a run killed mid-way and resumed follows it exactly (the decay keeps its total)."""
    settings = dict(updates=8, warmup_updates=2, save_every=2, lr_schedule="cosine")
    straight = run(tmp_path / "a", **settings)
    log = read_log(tmp_path / "a" / "out" / "toy" / "log.txt")
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (k - 2) / 6)) for k in range(2, 8)]
    assert [log[k]["lr"] for k in range(1, 9)] == pytest.approx([1e-2 * f for f in expected], rel=1e-6, abs=1e-12)

    class KilledAt5(ToyCore):  # dies during update 5; the last checkpoint holds update 4
        def forward_pass(self, batch, extras, models):
            if self.info.total_steps == 4:
                raise KeyboardInterrupt
            return super().forward_pass(batch, extras, models)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", KilledAt5, **settings)
    resumed = run(tmp_path / "b", **settings)
    resumed_log = read_log(tmp_path / "b" / "out" / "toy" / "log.txt")
    assert [resumed_log[k]["lr"] for k in range(5, 9)] == [log[k]["lr"] for k in range(5, 9)]
    for k, v in weights(straight).items():
        assert torch.equal(weights(resumed)[k], v)


def test_a_checkpoint_interrupted_while_written_is_never_used(tmp_path):
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(save_every=1, backup_every=2), distributed.DistEnv())
    for step in (1, 2, 3):
        manager.save(step, {"total_steps": step}, {"generator": model}, {"generator": (model, opt)})
    assert [s for s, _ in manager.checkpoints()] == [2, 3]  # 1 was replaced, 2 is a backup

    def crash(path):
        raise KeyboardInterrupt("killed while writing")

    manager.write_hook = crash
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        manager.save(4, {"total_steps": 4}, {"generator": model}, {"generator": (model, opt)})
    assert any(name.startswith(".step_00000004") for name in os.listdir(tmp_path))  # the partial write
    assert manager.latest().endswith("step_00000003")
    fresh = nn.Linear(3, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    info = manager.load(manager.latest(), {"generator": fresh}, {"generator": (fresh, fresh_opt)})
    assert info["total_steps"] == 3
    torch.testing.assert_close(fresh.weight, model.weight - 1)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    manager.write_hook = None
    manager.save(5, {"total_steps": 5}, {"generator": model})
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # leftovers are cleaned up


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Block(8), Block(8))
    checkpointed = copy.deepcopy(model)
    distributed.apply_activation_checkpointing(checkpointed, (Block,))
    x = torch.randn(5, 4)
    for m in (model, checkpointed):
        m(x).square().sum().backward()
    assert [model[1].calls, checkpointed[1].calls] == [1, 2]  # forward again in the backward pass
    for p, q in zip(model.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_wandb_is_optional_and_resumes_its_run(tmp_path, monkeypatch):
    calls, ids = [], iter(["run1", "run2"])
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)), log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)), util=types.SimpleNamespace(generate_id=lambda: next(ids)))
    run(tmp_path, updates=2, save_every=1, wandb_project="p")  # disabled by default: wandb (not installed) unused
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tmp_path / "b", updates=2, save_every=1, wandb_project="p", wandb_mode="offline")
    run(tmp_path / "b", updates=3, save_every=1, wandb_project="p", wandb_mode="offline")
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [(i["mode"], i["id"], i["resume"]) for i in inits] == [("offline", "run1", "allow")] * 2
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3] and "loss" in calls[1][2]


def test_upstream_import_path():
    import core
    assert core.WarpCore is WarpCore


def test_launchers_are_detected_from_the_environment():
    assert distributed.env_from({}) == distributed.DistEnv(0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert distributed.env_from(torchrun) == distributed.DistEnv(3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.env_from(slurm) == distributed.DistEnv(5, 8, 1)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init_process_group(distributed.env_from(slurm), torch.device("cpu"), environ=dict(slurm))
