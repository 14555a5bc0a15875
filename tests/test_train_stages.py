"""Stage B and C trainers on tiny configs and made-up shards: learning, accumulation, DDP/FSDP under torchrun,
kill -9 and resume, bad data, pyramid noise, and upstream's notebook API."""
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from core import distributed
from core.config import ConfigError
from core.conditioning import effnet_preprocess
from core.data import CorruptSampleWarning, EmptyDatasetError, ShardWriter
from core.metrics import read_log
from core.weights import load_state_dict_file, save_model
from modules.gdf.noise import randn
from modules.presets import build_model
from train import WurstCoreB, WurstCoreC
from train.train_b import pyramid_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_C = os.path.join(ROOT, "configs", "training", "tiny_c.yaml")
TINY_B = os.path.join(ROOT, "configs", "training", "tiny_b.yaml")


def split_images(count, size=64, seed=0):
    """Images with structure to learn: two noisy colours split at a random column."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        colours, cut = rng.integers(40, 216, size=(2, 3)), int(rng.integers(8, size - 8))
        image = rng.integers(-40, 40, size=(size, size, 3))
        image[:, :cut] += colours[0]
        image[:, cut:] += colours[1]
        images.append((PIL.Image.fromarray(image.astype(np.uint8)), cut))
    return images


def write_shards(pattern, count, per_shard, corrupt=()):
    """Shards of split images with captions naming the split; `corrupt` indices get bytes that are no image."""
    with ShardWriter(pattern, maxcount=per_shard) as writer:
        for i, (image, cut) in enumerate(split_images(count)):
            writer.write({"__key__": f"{i:05d}", "txt": f"a split at {cut}",
                          "png": b"not an image" if i in corrupt else image})  # lossless: the latents stay O(1)
    return writer.paths


def calibrated_effnet(path, images):
    """A random EfficientNet encoder with BatchNorm statistics of the training images, so that their latents are
    O(1) (with untouched statistics they are ~1e-7: denormal, and slow on a CPU)."""
    torch.manual_seed(0)
    effnet = build_model("effnet", "tiny").eval()
    for bn in (m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # the plain average over the calibration batch
        bn.train()
    batch = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 for image, _ in images])
    with torch.no_grad():
        effnet(effnet_preprocess(batch))
    save_model(effnet.eval(), path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_assets")
    write_shards(str(d / "data" / "%06d.tar"), count=32, per_shard=8)
    return types.SimpleNamespace(data=str(d / "data" / "{000000..000003}.tar"),
                                 effnet=calibrated_effnet(d / "effnet.safetensors", split_images(32)))


def settings(assets, tmp_path, **changes):
    base = {"webdataset_path": assets.data, "effnet_checkpoint_path": assets.effnet,
            "checkpoint_path": str(tmp_path / "ck"), "output_path": str(tmp_path / "out"),
            "num_workers": 0, "sample_every": 0}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


def final_weights(tmp_path, name="generator", experiment="tiny_c"):
    ck = tmp_path / "ck" / experiment
    return load_state_dict_file(ck / sorted(os.listdir(ck))[-1] / f"{name}.safetensors")


def assert_same_training(got, want, lr=1e-3):
    """Weights trained on the same samples in differently shaped batches or processes agree to fp32 round-off, as
    amplified by Adam: an element whose gradient is ~0 moves by ±lr either way. So: every element within one step
    of lr, and all but 0.1% within 1% of a step (a real difference, such as other samples or unsynchronised
    gradients, moves nearly every element by about lr)."""
    diff = torch.cat([(got[k].float() - want[k].float()).abs().flatten() for k in want])
    assert diff.max() < lr, diff.max()
    assert (diff > lr / 100).float().mean() < 1e-3, (diff > lr / 100).float().mean()


# ------------------------------------------------------------------------------------------ single process
def test_stage_c_learns_and_writes_sample_grids(assets, tmp_path):
    overrides = settings(assets, tmp_path, updates=20, save_every=20, lr=3e-3, sample_every="null")
    core = WurstCoreC(config_file_path=TINY_C, overrides=overrides)
    torch.manual_seed(core.config.seed)  # the initial weights the run starts from
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    batch = next(iter(core.setup_data(extras).dataloader))

    def fixed_batch_loss():  # over the same 8 draws of noise and noise level each time
        losses = []
        with torch.no_grad():
            for draw in range(8):
                core.info.iter = 1000 + draw
                losses.append(core.forward_pass(batch, extras, models)[0].mean().item())
        return sum(losses) / len(losses)

    before = fixed_batch_loss()
    core()
    models.generator.load_state_dict(final_weights(tmp_path))
    after = fixed_batch_loss()
    assert after < 0.85 * before, (before, after)
    grid = PIL.Image.open(tmp_path / "out" / "tiny_c" / "000020.jpg")
    # rows: images, noised, one-step predictions, samples; 2 images of the previewer's 16 px (2×2 latents × 8)
    assert grid.size == (2 * 16, 4 * 16)


def test_train_shift_moves_the_training_noise_levels_by_the_closed_form(assets, tmp_path):
    """train_shift s: a sample drawn at t trains at logSNR(t) - 2·log s (GDF's shift, as at sampling), while its
    loss weight stays that of the unshifted level."""
    seen = {}
    for shift in (1.0, 4.0):
        core = WurstCoreC(config_file_path=TINY_C, overrides=settings(assets, tmp_path, train_shift=shift,
                                                                       loss_weight="p2"))
        extras = core.setup_extras_pre()
        models = core.setup_models(extras)
        batch = next(iter(core.setup_data(extras).dataloader))

        def record(module, args, shift=shift):  # the noise condition the generator is called with
            seen[shift] = args[1]
        models.generator.register_forward_pre_hook(record)
        core.info.iter = 7  # the same per-sample draws of t in both runs
        core.forward_pass(batch, extras, models)
    # the noise condition is the cosine schedule's inverse: r = t of the unshifted run
    logSNR = extras.gdf.schedule(seen[1.0]) - 2 * math.log(4.0)
    torch.testing.assert_close(seen[4.0], extras.gdf.noise_cond(logSNR))
    assert (seen[4.0] > seen[1.0]).all()  # noisier: r grows with the noise level


def test_top_noise_share_trains_that_share_of_the_samples_at_the_top_of_the_schedule(assets, tmp_path):
    """top_noise_share p: a sample trains at t = 1 (the clamped top, where sampling starts) with probability p,
    else at the level it would have had without the option: the other draws are unchanged."""
    seen = {}
    for share in (0.0, 0.5, 1.0):
        core = WurstCoreC(config_file_path=TINY_C, overrides=settings(assets, tmp_path, train_shift=4.0,
                                                                       top_noise_share=share))
        extras = core.setup_extras_pre()
        models = core.setup_models(extras)
        batch = next(iter(core.setup_data(extras).dataloader))

        def record(module, args, share=share):
            seen[share] = args[1]
        models.generator.register_forward_pre_hook(record)
        core.info.iter = 3
        core.forward_pass(batch, extras, models)
    top = extras.gdf.noise_cond(extras.gdf.schedule(torch.ones(len(seen[0.0])), shift=4.0))
    torch.testing.assert_close(seen[1.0], top)
    assert (seen[0.0] < top - 1e-3).all()  # without the option no sample of this batch is at the top
    at_top = (seen[0.5] - top).abs() < 1e-6
    assert at_top.any() and not at_top.all(), seen[0.5]
    torch.testing.assert_close(seen[0.5][~at_top], seen[0.0][~at_top])


def test_top_noise_share_outside_0_to_1_is_refused_with_its_name(assets, tmp_path):
    with pytest.raises(ConfigError, match="top_noise_share"):
        WurstCoreC(config_file_path=TINY_C, overrides=settings(assets, tmp_path, top_noise_share=1.5))


def test_accumulating_two_half_batches_equals_one_full_batch_also_with_checkpointing(assets, tmp_path):
    def run(name, accum, checkpointing):
        overrides = settings(assets, tmp_path / name, updates=2, save_every=2, warmup_updates=0,
                             grad_accum_steps=accum, caption_dropout=0.5, clip_image_p=0.5,
                             gradient_checkpointing=checkpointing, **{"model_kwargs": "{dropout: [0, 0]}"})
        WurstCoreC(config_file_path=TINY_C, overrides=overrides)()
        return final_weights(tmp_path / name)

    # the half batches also recompute Stage C's blocks in the backward pass: that must not change training either
    full, halves = run("full", 1, "false"), run("halves", 2, "true")
    torch.manual_seed(42)
    initial = build_model("stage_c", "tiny", dropout=[0, 0]).state_dict()
    assert max((full[k] - initial[k]).abs().max() for k in full) > 1e-3
    assert_same_training(halves, full)


def test_stage_b_trains_on_non_square_buckets(assets, tmp_path):
    overrides = settings(assets, tmp_path, updates=2, save_every=2, multi_aspect_ratio="['1/2']",
                         bucketeer_random_ratio=0, sample_every=2)
    WurstCoreB(config_file_path=TINY_B, overrides=overrides)()
    log = read_log(tmp_path / "out" / "tiny_b" / "log.txt")
    assert all(np.isfinite(log[s]["loss"]) for s in (1, 2))
    grid = PIL.Image.open(tmp_path / "out" / "tiny_b" / "000002.jpg")
    # the square images go to the 64×32 (h×w) bucket; rows: images, noised, predictions, samples of 2 images
    assert grid.size == (2 * 32, 4 * 64)


def test_pyramid_noise_uses_height_and_width():
    shape = (2, 3, 8, 64)  # levels: 4×32, 2×16, 1×8 (height 1: the last level)

    def generators():
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    expected = randn(shape, gens := generators())
    total = 1.0
    for i in (1, 2, 3):
        level = randn((2, 3, 8 // 2 ** i, 64 // 2 ** i), gens)
        expected = expected + F.interpolate(level, size=(8, 64), mode="nearest") * 0.75 ** i
        total += 0.75 ** (2 * i)
    torch.testing.assert_close(pyramid_noise(shape, generators(), "cpu"), expected / total ** 0.5)
    big = pyramid_noise((16, 4, 128, 256), [torch.Generator().manual_seed(i) for i in range(16)], "cpu")
    assert abs(big.std().item() - 1) < 0.02


def test_corrupt_images_are_skipped_and_counted_and_an_empty_dataset_is_an_error(assets, tmp_path):
    write_shards(str(tmp_path / "bad" / "%06d.tar"), count=8, per_shard=8, corrupt={3})
    overrides = settings(assets, tmp_path, updates=4, save_every=4, batch_size=2,
                         webdataset_path=str(tmp_path / "bad" / "000000.tar"))
    with pytest.warns(CorruptSampleWarning, match="'00003'"):
        WurstCoreC(config_file_path=TINY_C, overrides=overrides)()
    log = read_log(tmp_path / "out" / "tiny_c" / "log.txt")
    assert log[4]["corrupt_samples"] == 1  # 7 good samples: 3 batches of 2 per epoch, so epoch 1 has ended
    write_shards(str(tmp_path / "worse" / "%06d.tar"), count=4, per_shard=4, corrupt={0, 1, 2, 3})
    overrides = settings(assets, tmp_path / "e", webdataset_path=str(tmp_path / "worse" / "000000.tar"))
    with pytest.warns(CorruptSampleWarning), pytest.raises(EmptyDatasetError, match="gave no batch"):
        WurstCoreC(config_file_path=TINY_C, overrides=overrides)()


def test_upstream_notebook_api(assets):
    """As upstream's notebooks: cores built with training=False, Stage B sharing Stage C's text encoder."""
    config = {"model_version": "tiny", "effnet_checkpoint_path": assets.effnet, "previewer_checkpoint_path": None,
              "clip_text_model_name": "tiny", "clip_image_model_name": "tiny"}
    core = WurstCoreC(config_dict=config, device="cpu", training=False)
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    batch = {"captions": ["a cat", "a dog"], "images": torch.rand(2, 3, 64, 64)}
    conditions = core.get_conditions(batch, models, extras, is_eval=True, is_unconditional=False,
                                     eval_image_embeds=True)
    unconditions = core.get_conditions(batch, models, extras, is_eval=True, is_unconditional=True)
    assert conditions["clip_img"].abs().sum() > 0 and unconditions["clip_img"].abs().sum() == 0
    latents = core.encode_latents(batch, models, extras)
    assert latents.shape == (2, 16, 2, 2)
    assert core.decode_latents(latents, batch, models, extras).shape == (2, 3, 16, 16)
    extras.sampling_configs["timesteps"] = 2
    *_, (sampled_c, _, _) = extras.gdf.sample(models.generator, conditions, latents.shape, unconditions,
                                              **extras.sampling_configs)

    config_b = {"model_version": "tiny", "effnet_checkpoint_path": assets.effnet, "stage_a_checkpoint_path": None}
    core_b = WurstCoreB(config_dict=config_b, device="cpu", training=False)
    extras_b = core_b.setup_extras_pre()
    models_b = core_b.setup_models(extras_b, skip_clip=True)
    models_b = WurstCoreB.Models(**{**models_b.to_dict(), "tokenizer": models.tokenizer,
                                    "text_model": models.text_model})
    conditions_b = core_b.get_conditions({"captions": batch["captions"]}, models_b, extras_b, is_eval=True)
    conditions_b["effnet"] = sampled_c
    unconditions_b = {**conditions_b, "effnet": torch.zeros_like(sampled_c)}
    extras_b.sampling_configs["timesteps"] = 2
    *_, (sampled_b, _, _) = extras_b.gdf.sample(models_b.generator, conditions_b, (2, 4, 16, 16), unconditions_b,
                                                **extras_b.sampling_configs)
    images = core_b.decode_latents(sampled_b, batch, models_b, extras_b)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


# --------------------------------------------------------------------------------------- subprocesses
def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnionOfTwoRanks(WurstCoreC):
    """One process fed, per update, rank 0's batch then rank 1's batch of a two-process run."""

    def setup_data(self, extras):
        single, parts = self.env, []
        for rank in (0, 1):
            self.env = distributed.DistEnv(rank, 2, 0)
            parts.append(super().setup_data(extras))
        self.env = single
        self.rank_shards = [p.dataloader.stream.rank_shards(0) for p in parts]
        union = ({"images": torch.cat([a["images"], b["images"]]), "captions": a["captions"] + b["captions"]}
                 for a, b in zip(parts[0].iterator, parts[1].iterator))
        return self.Data(iterator=union)

    def data_metrics(self, data):
        return {}


@pytest.mark.parametrize("use_fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one_process_on_their_union(assets, tmp_path, use_fsdp):
    common = dict(updates=3, save_every=3, batch_size=4, warmup_updates=0, adaptive_loss_weight="true",
                  ema_start_iters=1, ema_iters=1, ema_beta=0.5, use_fsdp=str(use_fsdp).lower(),
                  **{"model_kwargs": "{dropout: [0, 0]}"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(ROOT, "train", "train_c.py"), TINY_C, *settings(assets, tmp_path / "dist", **common)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "dist" / "out" / "tiny_c" / "log.txt").read_text().count("2 process(es)") == 1  # rank 0 logs

    core = UnionOfTwoRanks(config_file_path=TINY_C, overrides=settings(assets, tmp_path / "one", **common))
    core()
    assert not set(core.rank_shards[0]) & set(core.rank_shards[1])  # the ranks read disjoint shards
    for name in ("generator", "generator_ema"):
        assert_same_training(final_weights(tmp_path / "dist", name), final_weights(tmp_path / "one", name))
    two, one = (read_log(tmp_path / d / "out" / "tiny_c" / "log.txt") for d in ("dist", "one"))
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5)


def _start(args, tmp_path, name):
    log = open(tmp_path / f"{name}.stderr", "w")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(process, timeout=300):
    try:
        return process.wait(timeout)
    finally:
        with_group = process.pid
        try:
            os.killpg(with_group, signal.SIGKILL)  # DataLoader workers left behind by a killed trainer
        except ProcessLookupError:
            pass


def test_kill_9_and_restart_continues_exactly(assets, tmp_path):
    updates = 8
    run = settings(assets, tmp_path / "run", updates=updates, save_every=2, grad_accum_steps=2, num_workers=1,
                   ema_start_iters=2, ema_iters=2, ema_beta=0.9, adaptive_loss_weight="true")
    reference = settings(assets, tmp_path / "ref", updates=updates, save_every=2, grad_accum_steps=2,
                         num_workers=1, ema_start_iters=2, ema_iters=2, ema_beta=0.9, adaptive_loss_weight="true")
    cli = [os.path.join(ROOT, "train", "train_c.py"), TINY_C]
    straight = _start([*cli, *reference], tmp_path, "ref")
    log_path = tmp_path / "run" / "out" / "tiny_c" / "log.txt"
    kill_at = random.Random(os.getpid()).randint(3, updates - 2)

    # 1. kill -9 once the log shows update `kill_at`
    first = _start([*cli, *run], tmp_path, "first")
    while not (log_path.exists() and max(read_log(log_path), default=0) >= kill_at):
        assert first.poll() is None, (tmp_path / "first.stderr").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    _finish(first)
    checkpoints = sorted(os.listdir(tmp_path / "run" / "ck" / "tiny_c"))
    resumed_from = int(checkpoints[-1].split("_")[1])
    assert resumed_from < updates

    # 2. restart, and be killed while writing the next checkpoint (after its first file)
    crash = ("import os, signal, sys; from train.train_c import WurstCoreC; "
             "core = WurstCoreC(config_file_path=sys.argv[1], overrides=sys.argv[2:]); "
             "core.checkpoints.write_hook = lambda path: os.kill(os.getpid(), signal.SIGKILL); core()")
    second = _start(["-c", crash, TINY_C, *run], tmp_path, "second")
    assert _finish(second) == -signal.SIGKILL
    names = os.listdir(tmp_path / "run" / "ck" / "tiny_c")
    assert [n for n in names if n.startswith(".step_")], names  # the half-written checkpoint, never renamed
    assert sorted(n for n in names if n.startswith("step_"))[-1] == checkpoints[-1]

    # 3. restart again: it resumes from the last complete checkpoint and finishes
    third = _start([*cli, *run], tmp_path, "third")
    assert _finish(third) == 0, (tmp_path / "third.stderr").read_text()[-3000:]
    assert _finish(straight) == 0, (tmp_path / "ref.stderr").read_text()[-3000:]
    text = log_path.read_text()
    assert text.count(f"resumed from {tmp_path / 'run' / 'ck' / 'tiny_c' / checkpoints[-1]}") == 2
    want = read_log(tmp_path / "ref" / "out" / "tiny_c" / "log.txt")
    logged = [(int(line.split(" step=")[1].split()[0]), float(line.split(" loss=")[1].split()[0]))
              for line in text.splitlines() if " step=" in line and " loss=" in line]  # every run's lines
    assert {step for step, _ in logged} == set(range(1, updates + 1)) and len(logged) > updates
    assert [loss for _, loss in logged] == [want[step]["loss"] for step, _ in logged]
    for name in ("generator", "generator_ema"):
        a, b = final_weights(tmp_path / "run", name), final_weights(tmp_path / "ref", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
