"""core/data end to end: shards written by the tests, read back as batches; resuming; caching; make_shards."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

from core.data import (Buckets, CorruptSampleWarning, EmptyDatasetError, ShardWriter, build_cached_dataloader,
                       build_dataloader, cache_to_shards)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(128, 64), (64, 128), (100, 100), (90, 160), (160, 90)]  # (h, w): five aspect ratios


def image(height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def write_dataset(folder, shards, per_shard, sizes=SIZES):
    """Shards of PNG samples whose key names shard, index and size; captions and JSON say the same."""
    keys = []
    for s in range(shards):
        with ShardWriter(str(folder / f"s{s}-%03d.tar"), maxcount=per_shard) as writer:
            for i in range(per_shard):
                h, w = sizes[(s * per_shard + i) % len(sizes)]
                key = f"s{s}_{i:03d}_{h}x{w}"
                writer.write({"__key__": key, "png": image(h, w, s * 1000 + i), "txt": f"caption {key}",
                              "json": {"width": w, "height": h}})
                keys.append(key)
    return keys


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def loader(path, **kw):
    settings = dict(batch_size=2, image_size=128, num_workers=0, seed=0)
    settings.update(kw)
    return build_dataloader(str(path), settings.pop("batch_size"), **settings)


def test_writer_round_trips_images_captions_json_and_tensors(tmp_path):
    originals = [image(64, 64, i) for i in range(5)]
    with ShardWriter(str(tmp_path / "out" / "shard-%02d.tar"), maxcount=2) as writer:
        for i, img in enumerate(originals):
            writer.write({"__key__": f"k{i}", "png": img, "txt": f"caption {i}", "json": {"index": i},
                          "latent.npy": torch.full((2, 3), float(i), dtype=torch.bfloat16)})
    assert [os.path.basename(p) for p in writer.paths] == ["shard-00.tar", "shard-01.tar", "shard-02.tar"]
    with tarfile.open(writer.paths[0]) as tar:
        assert tar.getnames() == ["k0.json", "k0.latent.npy", "k0.png", "k0.txt",
                                  "k1.json", "k1.latent.npy", "k1.png", "k1.txt"]
        assert json.loads(tar.extractfile("k1.json").read()) == {"index": 1}
        assert np.load(io.BytesIO(tar.extractfile("k1.latent.npy").read())).tolist() == [[1.0] * 3] * 2
        assert tar.extractfile("k1.txt").read() == b"caption 1"
    batches = list(loader(tmp_path / "out", batch_size=1, image_size=64, crop="center", drop_last=False).iter_epoch())
    assert sorted(k for b in batches for k in b["keys"]) == [f"k{i}" for i in range(5)]
    for batch in batches:
        i = int(batch["keys"][0][1:])
        assert batch["captions"] == [f"caption {i}"]
        assert batch["images"].dtype == torch.float32 and batch["images"].shape == (1, 3, 64, 64)
        assert torch.equal(batch["images"][0], TF.to_tensor(originals[i]))
    with pytest.raises(ValueError, match="%d"):
        ShardWriter(str(tmp_path / "no-index.tar"))


def test_corrupt_images_are_skipped_with_a_counted_warning(tmp_path):
    good = PIL.Image.new("RGB", (64, 64), "red")
    png = io.BytesIO()
    image(64, 64, 0).save(png, format="PNG")
    with ShardWriter(str(tmp_path / "s-%d.tar")) as writer:
        for i in range(4):
            writer.write({"__key__": f"good{i}", "png": good, "txt": "red"})
        writer.write({"__key__": "garbage", "jpg": b"this is not a jpeg", "txt": "x"})
        writer.write({"__key__": "truncated", "png": png.getvalue()[:len(png.getvalue()) // 2], "txt": "x"})
        writer.write({"__key__": "nocaption", "png": good})
    data = loader(tmp_path, batch_size=1, image_size=64)
    with pytest.warns(CorruptSampleWarning) as warned:
        keys = [k for batch in data.iter_epoch() for k in batch["keys"]]
    assert sorted(keys) == [f"good{i}" for i in range(4)]
    assert data.stats["corrupt"] == 3 and data.stats["samples"] == 7
    messages = [str(w.message) for w in warned]
    assert len(messages) == 3 and "3 corrupt samples skipped so far" in messages[-1]
    assert any("'garbage'" in m for m in messages) and any("no 'txt' entry" in m for m in messages)


def test_empty_datasets_are_clear_errors(tmp_path):
    write_dataset(tmp_path, shards=2, per_shard=3)
    strict = loader(tmp_path, dataset_filters=[["width", "lambda w: w >= 10000"]])
    with pytest.raises(EmptyDatasetError, match="'filtered': 6"):
        next(iter(strict))
    with pytest.raises(EmptyDatasetError, match="no batch"):
        next(iter(loader(tmp_path, batch_size=7)))  # fewer samples than one batch
    with pytest.raises(ValueError, match="cannot be split between 3 ranks"):
        loader(tmp_path, rank=0, world_size=3)
    with pytest.raises(ValueError, match="no shards found"):
        loader(tmp_path / "s9-{000..001}.tar".replace("{000..001}", "*"))


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    keys = write_dataset(tmp_path, shards=6, per_shard=4, sizes=[(64, 64)])
    seen = []
    for rank in range(2):
        data = loader(tmp_path, rank=rank, world_size=2, num_workers=2, image_size=64)
        rank_keys = [k for batch in data.iter_epoch() for k in batch["keys"]]
        assert len(rank_keys) == len(set(rank_keys)) == 12
        shards = {k.split("_")[0] for k in rank_keys}
        assert len(shards) == 3 and shards == {os.path.basename(data.stream.shards[i]).split("-")[0]
                                               for i in data.stream.rank_shards(0)}
        seen.append(set(rank_keys))
        assert len({tuple(data.stream.rank_shards(epoch)) for epoch in range(4)}) > 1  # reshuffled per epoch
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(keys)


@pytest.mark.parametrize("multiple", [32, 64])
def test_multi_aspect_batches_hold_one_bucket_in_multiples(tmp_path, multiple):
    write_dataset(tmp_path, shards=2, per_shard=10)
    ratios = ["1/1", "1/2", "9/16"]
    buckets = Buckets.build(128, ratios, multiple)
    data = loader(tmp_path, multi_aspect_ratio=ratios, size_multiple=multiple, crop="random")
    shapes = set()
    for batch in data.iter_epoch():
        h, w = batch["images"].shape[-2:]
        assert h % multiple == 0 and w % multiple == 0 and batch["images"].shape[:2] == (2, 3)
        for key in batch["keys"]:
            orig_h, orig_w = map(int, key.split("_")[-1].split("x"))
            assert buckets.closest(orig_h, orig_w) == (h, w)
        assert 0 <= batch["images"].min() and batch["images"].max() <= 1
        shapes.add((h, w))
    assert shapes == {buckets.closest(h, w) for h, w in SIZES}  # 5 buckets at 32, 3 at 64 (9:16 → 1:2)
    assert len(shapes) == (5 if multiple == 32 else 3)


def test_caption_dropout_rate(tmp_path):
    with ShardWriter(str(tmp_path / "s-%d.tar")) as writer:
        for i in range(300):
            writer.write({"__key__": f"k{i}", "png": PIL.Image.new("RGB", (8, 8)), "txt": f"caption {i}"})

    def dropped(p):
        batches = loader(tmp_path, batch_size=50, image_size=8, size_multiple=8, caption_dropout=p).iter_epoch()
        return sum(c == "" for b in batches for c in b["captions"])

    assert dropped(0.0) == 0 and dropped(1.0) == 300
    assert 50 <= dropped(0.25) <= 100  # mean 75, sd 7.5


def test_order_is_fixed_by_seed_and_changes_with_epoch(tmp_path):
    write_dataset(tmp_path, shards=3, per_shard=4, sizes=[(64, 64)])

    def epochs(seed, n=2):
        data = loader(tmp_path, seed=seed, image_size=64, shuffle_buffer=8)
        return [[k for b in data.iter_epoch() for k in b["keys"]] for _ in range(n)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again and first[0] != first[1] and first != other
    assert sorted(first[0]) == sorted(first[1])


def test_resume_gives_the_batches_an_uninterrupted_run_gets(tmp_path):
    write_dataset(tmp_path, shards=3, per_shard=8)  # one worker reads two shards, the other one
    settings = dict(multi_aspect_ratio=["1/1", "1/2", "9/16"], crop="random", caption_dropout=0.3,
                    p_random_ratio=0.2, num_workers=2, seed=3, shuffle_buffer=5)
    straight = take(iter(loader(tmp_path, **settings)), 24)  # over two epochs
    assert len({k for b in straight[:8] for k in b["keys"]}) == 16
    for stop in (3, 8, 9, 15):  # before and after a worker runs dry (batch 4), at the end of epoch 0 (9), in epoch 1
        first = loader(tmp_path, **settings)
        take(iter(first), stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = loader(tmp_path, **settings)
        resumed.load_state_dict(state)
        for expected, batch in zip(straight[stop:stop + 8], take(iter(resumed), 8)):
            assert batch["keys"] == expected["keys"] and batch["captions"] == expected["captions"]
            assert torch.equal(batch["images"], expected["images"])
    with pytest.raises(ValueError, match="workers"):
        loader(tmp_path, **{**settings, "num_workers": 1}).load_state_dict(state)


def test_reading_leaves_the_global_torch_rng_alone(tmp_path):
    """The trainer's noise must not depend on when data epochs start (they start at other steps after a resume)."""
    write_dataset(tmp_path, shards=1, per_shard=2, sizes=[(64, 64)])
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    next(iter(loader(tmp_path, image_size=64, crop="random")))
    assert torch.equal(torch.rand(4), expected)


def test_pipe_urls_are_read(tmp_path):
    keys = write_dataset(tmp_path, shards=2, per_shard=2, sizes=[(64, 64)])
    urls = [f"pipe:cat {tmp_path}/s{s}-000.tar" for s in range(2)]
    data = build_dataloader(urls, 1, image_size=64, num_workers=0)
    assert sorted(k for b in data.iter_epoch() for k in b["keys"]) == sorted(keys)


def test_cached_latents_and_embeddings_replace_the_encoders(tmp_path):
    write_dataset(tmp_path / "images", shards=1, per_shard=6, sizes=[(64, 64), (64, 128)])
    images = loader(tmp_path / "images", image_size=64, multi_aspect_ratio=["1/2"], drop_last=False,
                    shuffle_buffer=0)

    def encode(batch):  # stands in for the frozen EfficientNet and text encoder
        pooled = torch.tensor([[[len(c), 1.0, 2.0]] for c in batch["captions"]])
        return {"effnet": torch.nn.functional.avg_pool2d(batch["images"], 16), "clip_text_pooled": pooled}

    expected = {}
    for batch in images.iter_epoch():
        out = encode(batch)
        expected.update({k: (out["effnet"][i], out["clip_text_pooled"][i], c)
                         for i, (k, c) in enumerate(zip(batch["keys"], batch["captions"]))})
    images.epoch = 0
    paths = cache_to_shards(images.iter_epoch(), encode, str(tmp_path / "cache" / "c-%03d.tar"), maxcount=4)
    assert len(paths) == 2

    cached = build_cached_dataloader(str(tmp_path / "cache"), 2, tensors=["effnet", "clip_text_pooled"],
                                     num_workers=0, drop_last=False)
    got = {}
    for batch in cached.iter_epoch():
        assert batch["effnet"].shape[0] == batch["clip_text_pooled"].shape[0]
        got.update({k: (batch["effnet"][i], batch["clip_text_pooled"][i], batch["captions"][i])
                    for i, k in enumerate(batch["keys"])})
    assert got.keys() == expected.keys() and len(got) == 6
    for key, (effnet, pooled, caption) in expected.items():
        assert torch.equal(got[key][0], effnet) and torch.equal(got[key][1], pooled) and got[key][2] == caption

    empty = {"clip_text_pooled": torch.zeros(1, 3)}
    dropped = build_cached_dataloader(str(tmp_path / "cache"), 2, tensors=["effnet", "clip_text_pooled"],
                                      caption_dropout=1.0, empty=empty, num_workers=0, drop_last=False)
    for batch in dropped.iter_epoch():
        assert set(batch["captions"]) == {""} and not batch["clip_text_pooled"].any() and batch["effnet"].any()


def test_make_shards_turns_a_folder_into_readable_shards(tmp_path):
    from skimage import data as photos
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for name, photo, ext in (("astronaut", photos.astronaut(), "png"), ("coffee", photos.coffee(), "jpg"),
                             ("cats/chelsea", photos.chelsea(), "jpeg")):
        PIL.Image.fromarray(photo).resize((photo.shape[1] // 4, photo.shape[0] // 4)).save(folder / f"{name}.{ext}")
    (folder / "astronaut.txt").write_text("an astronaut\n")
    (folder / "cats" / "chelsea.txt").write_text("a cat")
    (folder / "broken.png").write_bytes(b"not a png")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shards.py"), str(folder),
                             str(tmp_path / "shards"), "--maxcount", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 samples to 2 shard(s)" in result.stdout and "broken.png" in result.stdout
    assert sorted(os.listdir(tmp_path / "shards")) == ["shard-000000.tar", "shard-000001.tar"]
    data = loader(tmp_path / "shards", batch_size=1, image_size=64, dataset_filters=[["width", "lambda w: w > 120"]])
    captions = sorted(c for b in data.iter_epoch() for c in b["captions"])
    assert captions == ["", "an astronaut"]  # coffee (150 px wide) has no .txt; chelsea is 112 px wide
    assert data.stats["samples"] == 3 and data.stats["filtered"] == 1
