"""Folder of images with `.txt` captions → webdataset shards for training.

    python scripts/make_shards.py path/to/images path/to/shards [--maxcount 1000]

OUTPUT is a folder (shards are named shard-000000.tar, ...) or a pattern with a %d field.
Point the config's `webdataset_path` at the output folder.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from core.data import folder_to_shards  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of images (.jpg/.jpeg/.png/.webp) and their .txt captions")
    parser.add_argument("output", help="output folder, or a shard pattern such as out/part-%%05d.tar")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    pattern = args.output if "%" in args.output else os.path.join(args.output, "shard-%06d.tar")
    report = folder_to_shards(args.folder, pattern, args.maxcount)
    print(f"wrote {report.written} samples to {len(report.paths)} shard(s) ({pattern})")
    if report.uncaptioned:
        print(f"{len(report.uncaptioned)} image(s) had no .txt caption and got an empty one")
    if report.corrupt:
        print(f"skipped {len(report.corrupt)} unreadable image(s): {', '.join(report.corrupt)}")


if __name__ == "__main__":
    main()
