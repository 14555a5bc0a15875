"""Turn the config's `webdataset_path` into an explicit list of shard URLs.

Upstream folded everything into one `pipe:` command; an explicit list is what lets each rank and each
DataLoader worker read its own disjoint part of the shards.
"""
import glob
import os
import shlex
import shutil
import subprocess

import braceexpand
import yaml

# URL schemes that webdataset's gopen opens itself; they pass through unchanged.
PASS_THROUGH = ("pipe:", "file:", "http://", "https://", "gs://", "hf://")
LIST_FILES = (".txt", ".yml", ".yaml")


def resolve_shards(spec) -> list:
    """Expand `spec` into shard URLs, in the order given.

    `spec` is a shard path, a brace pattern (`data/{000..009}.tar`), a glob, a directory (its `*.tar`), a URL
    (`file:`, `pipe:`, `http(s)://`, ...), `s3://bucket/key.tar` or an `s3://` prefix (read through the AWS
    CLI), a `.txt` file with one entry per line or a `.yml`/`.yaml` file holding a list, or a list of any of
    these. Relative entries of a list file are relative to that file's folder.
    """
    shards = _resolve(spec, base=None)
    if not shards:
        raise ValueError(f"no shards found for webdataset_path {spec!r}")
    return shards


def _resolve(spec, base):
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in _resolve(item, base)]
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"webdataset_path entries must be strings or lists, got {spec!r}")
    return [url for item in braceexpand.braceexpand(spec.strip()) for url in _resolve_one(item, base)]


def _resolve_one(item, base):
    if item.startswith("s3://"):
        return _s3(item)
    if item.startswith(PASS_THROUGH):
        return [item]
    path = item if base is None or os.path.isabs(item) else os.path.join(base, item)
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard or shard list {path!r} does not exist")
    if path.endswith(LIST_FILES):
        return _resolve(_read_list(path), base=os.path.dirname(os.path.abspath(path)))
    return [path]


def _read_list(path):
    with open(path, encoding="utf-8") as file:
        if path.endswith(".txt"):
            lines = (line.strip() for line in file)
            return [line for line in lines if line and not line.startswith("#")]
        entries = yaml.safe_load(file)
    return entries if entries is not None else []


def _s3(url):
    """`s3://` shards stream through `aws s3 cp KEY -`; a URL not ending in `.tar` is a prefix to list."""
    aws = shutil.which("aws")
    if aws is None:
        raise RuntimeError(f"{url}: reading s3:// shards needs the AWS CLI (`aws`) on PATH")
    if url.endswith(".tar"):
        keys = [url]
    else:
        listing = subprocess.run([aws, "s3", "ls", "--recursive", url], capture_output=True, text=True, check=True)
        bucket = "s3://" + url[len("s3://"):].split("/")[0]
        # lines read `DATE TIME SIZE KEY`; keys may hold spaces
        names = [line.split(None, 3)[3] for line in listing.stdout.splitlines() if len(line.split(None, 3)) == 4]
        keys = [f"{bucket}/{name}" for name in names if name.endswith(".tar")]
    return [f"pipe:{shlex.quote(aws)} s3 cp {shlex.quote(key)} -" for key in keys]
