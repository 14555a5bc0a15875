"""Config-facing parts of core/data: filters, caption getters, buckets, crops, shard resolution."""
import random
import stat
import subprocess

import pytest
import torch
import yaml

from core.data import UPSTREAM_RATIOS, Buckets, SmartCrop, parse_captions_getter, parse_filters, resolve_shards
from core.data.crop import make_crop, resize_to_cover
from core.data.errors import CorruptSample


# --- dataset_filters ------------------------------------------------------------------------------------------
def test_upstream_lambda_filters_are_parsed_into_named_comparisons():
    width, height, watermark, score = parse_filters([
        ["width", "lambda w: w >= 768"], ["height", "lambda h: h >= 768"],
        ["pwatermark", "lambda x: x < 0.5"], ["normalized_score", "lambda s: s > 9.0"]])
    assert width.name == "width >= 768" and watermark.name == "pwatermark < 0.5"
    assert width({"width": 768}) and not width({"width": 767})
    assert height({"height": 1024}) and not height({"height": 512})
    assert watermark({"pwatermark": 0.1}) and not watermark({"pwatermark": 0.5})
    assert score({"normalized_score": 9.5}) and not score({"normalized_score": 9.0})


def test_missing_or_incomparable_values_drop_the_sample():
    (keep,) = parse_filters([["width", "lambda w: w >= 512"]])
    assert not keep({}) and not keep({"width": None}) and not keep({"width": "wide"})


def test_combined_chained_multi_key_and_negative_comparisons():
    both, band, either, lang = parse_filters([
        [["width", "height"], "lambda w, h: w >= 512 and h >= 256"],
        ["score", "lambda s: -1 < s <= 0.5"],
        ["aesthetic", "lambda a: a > 6 or a == -1"],
        ["language", "lambda l: l != 'de'"]])
    assert both({"width": 512, "height": 256}) and not both({"width": 512, "height": 255})
    assert both.name == "width >= 512 and height >= 256"
    assert band({"score": 0.5}) and band({"score": -0.5}) and not band({"score": -1}) and not band({"score": 0.6})
    assert either({"aesthetic": 7}) and either({"aesthetic": -1}) and not either({"aesthetic": 5})
    assert lang({"language": "en"}) and not lang({"language": "de"})


def test_threshold_dicts_accept_the_misspelt_thresold():
    right, misspelt, below = parse_filters([{"key": "aesthetic", "threshold": 5.0},
                                            {"key": "aesthetic", "thresold": 5.0},
                                            {"key": "pwatermark", "op": "<", "thresold": 0.5}])
    assert right.name == misspelt.name == "aesthetic >= 5.0"
    for keep in (right, misspelt):
        assert keep({"aesthetic": 5.0}) and not keep({"aesthetic": 4.9})
    assert below({"pwatermark": 0.2}) and not below({"pwatermark": 0.7})
    with pytest.raises(ValueError, match="threshold"):
        parse_filters([{"key": "a", "threshold": 1, "thresold": 2}])
    with pytest.raises(ValueError, match="unknown"):
        parse_filters([{"key": "a", "threshold": 1, "limit": 2}])


@pytest.mark.parametrize("text", [
    "lambda x: __import__('os').system('touch /tmp/pwned') == 0",
    "lambda x: x.startswith('a')",
    "lambda x: len(x) > 3",
    "lambda x: x + 1 > 3",
    "lambda x: x in (1, 2)",
    "lambda x: y > 3",
    "lambda x, y: x > 3",
    "lambda x=1: x > 3",
    "x > 3",
    "lambda x: x >",
])
def test_anything_but_simple_comparisons_is_refused_naming_the_string(text):
    with pytest.raises(ValueError) as error:
        parse_filters([["width", text]])
    assert repr(text) in str(error.value)


# --- captions_getter ------------------------------------------------------------------------------------------
def test_caption_getters_by_name():
    rng = random.Random(0)
    assert parse_captions_getter(None)({"txt": b" a cat \n"}, rng) == "a cat"
    assert parse_captions_getter(["txt", "identity"])({"txt": "a dog"}, rng) == "a dog"
    assert parse_captions_getter(["json", "json_caption"])({"json": {"caption": "a fox"}}, rng) == "a fox"
    with pytest.raises(ValueError, match="unknown getter 'captions_getterx'"):
        parse_captions_getter(["json", "captions_getterx"])
    with pytest.raises(CorruptSample, match="no 'txt' entry"):
        parse_captions_getter(None)({"json": {}}, rng)


def test_upstream_captions_getter_shows_the_original_caption_5_percent_of_the_time():
    getter = parse_captions_getter(["json", "captions_getter"])
    sample = {"json": {"caption": "recaptioned", "old_caption": '{"og_caption": "original"}'}}
    rng = random.Random(0)
    originals = sum(getter(sample, rng) == "original" for _ in range(4000))
    assert 120 < originals < 280  # 5 % of 4000 = 200
    assert getter({"json": {"caption": "only"}}, rng) == "only"


# --- buckets and crops ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiple", [32, 64])
def test_upstream_buckets_have_sides_in_multiples_and_area_near_image_size(multiple):
    buckets = Buckets.build(768, UPSTREAM_RATIOS, multiple)
    assert len(buckets.sizes) == 23  # 12 ratios and their reciprocals, 1/1 once
    for (h, w), ratio in zip(buckets.sizes, buckets.ratios):
        assert h % multiple == 0 and w % multiple == 0
        assert h * w <= 768 ** 2 and abs(w / h - ratio) < 0.25 * ratio
    assert buckets.closest(500, 1000) == buckets.sizes[buckets.ratios.index(2.0)]
    assert buckets.closest(1000, 562) == buckets.sizes[buckets.ratios.index(9 / 16)]
    assert Buckets.build(768).sizes == ((768, 768),)


def test_resize_covers_and_crops_give_the_bucket_size():
    image = torch.rand(3, 90, 200)
    covered = resize_to_cover(image, (64, 96))
    assert covered.shape[-2] == 64 and covered.shape[-1] >= 96
    rng = random.Random(0)
    for mode in ("center", "random", "smart"):
        assert make_crop(mode)(covered, (64, 96), rng).shape == (3, 64, 96)
    with pytest.raises(ValueError, match="crop='smart'"):
        make_crop("center", saliency_model=lambda x: x)


def salient_columns(lo, hi):
    """A stand-in saliency model: columns between fractions lo and hi of the width are salient."""
    def model(x):
        columns = torch.linspace(0, 1, x.shape[-1])
        return ((columns >= lo) & (columns <= hi)).float().expand(1, 1, *x.shape[-2:])
    return model


def test_smart_crop_follows_saliency_and_centres_without_a_model():
    image = torch.arange(300.0).repeat(3, 100, 1)  # value = column index
    rng = random.Random(0)

    def left_edge(crop):
        return int(crop(image, (100, 100), rng)[0, 0, 0])

    assert left_edge(SmartCrop(salient_columns(0.85, 1.0), randomize_p=0.0)) == 200  # clamped at the right edge
    assert left_edge(SmartCrop(salient_columns(0.0, 0.15), randomize_p=0.0)) == 0
    assert left_edge(SmartCrop(salient_columns(0.6, 0.7), randomize_p=0.0)) == 145  # centred on column 195
    assert left_edge(SmartCrop(None)) == 100
    jittered = {left_edge(SmartCrop(salient_columns(0.48, 0.52), randomize_p=1.0, randomize_q=0.2)) for _ in range(20)}
    assert len(jittered) > 5 and min(jittered) >= 40 and max(jittered) <= 160  # ±0.2·300 around 100


# --- webdataset_path ------------------------------------------------------------------------------------------
@pytest.fixture
def tars(tmp_path):
    paths = [tmp_path / f"part-{i:03d}.tar" for i in range(4)]
    for p in paths:
        p.write_bytes(b"")
    return [str(p) for p in paths]


def test_patterns_folders_globs_lists_and_urls_resolve(tmp_path, tars):
    assert resolve_shards(str(tmp_path / "part-{000..003}.tar")) == tars
    assert resolve_shards(str(tmp_path)) == tars
    assert resolve_shards(str(tmp_path / "part-*.tar")) == tars
    (tmp_path / "list.txt").write_text("# shards\npart-000.tar\n\n" + tars[1] + "\npart-{002..003}.tar\n")
    assert resolve_shards(str(tmp_path / "list.txt")) == tars
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(["part-000.tar", "part-{001..003}.tar"]))
    assert resolve_shards(str(tmp_path / "list.yaml")) == tars
    assert resolve_shards([tars[0], [str(tmp_path / "list.yaml")]]) == tars[:1] + tars
    urls = ["file:" + tars[0], "pipe:cat " + tars[1], "https://host/a.tar"]
    assert resolve_shards(urls) == urls
    assert resolve_shards("pipe:cat {a,b}.tar") == ["pipe:cat a.tar", "pipe:cat b.tar"]


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tar"):
        resolve_shards(str(tmp_path / "nothere.tar"))
    with pytest.raises(ValueError, match="no shards found"):
        resolve_shards(str(tmp_path))
    (tmp_path / "empty.yml").write_text("")
    with pytest.raises(ValueError, match="no shards found"):
        resolve_shards(str(tmp_path / "empty.yml"))


def fake_aws(folder, bucket_root):
    """An `aws` executable that serves `s3://bucket/...` from a local folder."""
    script = folder / "aws"
    script.write_text(f"""#!/bin/sh
root={bucket_root}
if [ "$2" = ls ]; then
  prefix=$(echo "$4" | sed 's#s3://[^/]*/##')
  cd $root && find . -type f | sed 's#^./##' | grep "^$prefix" | sort |
    while read f; do echo "2024-01-01 00:00:00 1 $f"; done
elif [ "$2" = cp ]; then
  cat "$root/$(echo "$3" | sed 's#s3://[^/]*/##')"
fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_s3_needs_the_aws_cli_and_lists_prefixes_through_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    with pytest.raises(RuntimeError, match="AWS CLI"):
        resolve_shards("s3://bucket/data/a.tar")
    bucket = tmp_path / "bucket"
    (bucket / "data" / "sub").mkdir(parents=True)
    for name in ("data/a.tar", "data/sub/b.tar", "data/notes.md"):
        (bucket / name).write_bytes(name.encode())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = fake_aws(bin_dir, bucket)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    urls = resolve_shards(["s3://bucket/data/", "s3://bucket/data/a.tar"])
    assert urls == [f"pipe:{aws} s3 cp s3://bucket/data/a.tar -", f"pipe:{aws} s3 cp s3://bucket/data/sub/b.tar -",
                    f"pipe:{aws} s3 cp s3://bucket/data/a.tar -"]
    assert subprocess.run(urls[1][len("pipe:"):], shell=True, capture_output=True).stdout == b"data/sub/b.tar"
