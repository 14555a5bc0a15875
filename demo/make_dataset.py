"""Write the demo dataset: training scenes as webdataset shards, plus the held-out prompt list for evaluation.

    python -m demo.make_dataset OUT [--num-train 20000] [--num-heldout 300] [--num-zorb 0] [--seed 0]

OUT/train/shard-*.tar      image (png or jpg) + caption (txt) + attributes (json) per sample
OUT/heldout_prompts.json   [{prompt, seed, attributes}] from held-out (shape, colour, background) triples
OUT/zorb/shard-*.tar and OUT/zorb_prompts.json, with --num-zorb > 0: the LoRA new-token data ('[zorb]')

Everything is a function of --seed; the same arguments write byte-identical files.
Point a trainer's `webdataset_path` at OUT/train.
"""
import argparse
import json
import os

from core.data import ShardWriter

from .scenes import prompt_records, sample_heldout_scenes, sample_train_scenes, sample_zorb_scenes

# distinct sampling streams per split, so that changing one count leaves the other splits unchanged
SPLIT_SEEDS = {"train": 0, "heldout": 1, "zorb": 2, "zorb_prompts": 3}


def write_shards(scenes, pattern: str, image_size: int, image_format: str = "png", maxcount: int = 1000) -> list:
    """One sample per scene, keyed by its index; returns the shard paths."""
    with ShardWriter(pattern, maxcount) as writer:
        for index, scene in enumerate(scenes):
            writer.write({"__key__": f"{index:09d}", image_format: scene.render(image_size), "txt": scene.caption(),
                          "json": {**scene.attributes(), "variant": scene.variant, "width": image_size,
                                   "height": image_size}})
    return writer.paths


def _write_json(path: str, records):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(records, file, indent=1)


def make_dataset(out: str, num_train: int, num_heldout: int = 300, num_zorb: int = 0, seed: int = 0,
                 image_size: int = 256, image_format: str = "png", maxcount: int = 1000) -> dict:
    """Write the files listed in the module docstring; returns {name: path or shard paths}."""
    if num_train < 1:
        raise ValueError(f"num_train must be at least 1, got {num_train}")
    os.makedirs(out, exist_ok=True)
    written = {"train": write_shards(sample_train_scenes(num_train, [seed, SPLIT_SEEDS["train"]]),
                                     os.path.join(out, "train", "shard-%06d.tar"), image_size, image_format, maxcount),
               "heldout_prompts": os.path.join(out, "heldout_prompts.json")}
    _write_json(written["heldout_prompts"],
                prompt_records(sample_heldout_scenes(num_heldout, [seed, SPLIT_SEEDS["heldout"]])))
    if num_zorb > 0:
        written["zorb"] = write_shards(sample_zorb_scenes(num_zorb, [seed, SPLIT_SEEDS["zorb"]]),
                                       os.path.join(out, "zorb", "shard-%06d.tar"), image_size, image_format, maxcount)
        written["zorb_prompts"] = os.path.join(out, "zorb_prompts.json")
        _write_json(written["zorb_prompts"],
                    prompt_records(sample_zorb_scenes(num_heldout, [seed, SPLIT_SEEDS["zorb_prompts"]])))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo.make_dataset", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--num-train", type=int, default=20000, help="training samples")
    parser.add_argument("--num-heldout", type=int, default=300, help="held-out evaluation prompts")
    parser.add_argument("--num-zorb", type=int, default=0, help="zorb samples for the LoRA experiment (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images")
    parser.add_argument("--format", default="png", choices=["png", "jpg"], help="image encoding")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    written = make_dataset(args.out, args.num_train, args.num_heldout, args.num_zorb, args.seed, args.image_size,
                           args.format, args.maxcount)
    for name, value in written.items():
        print(f"{name}: {len(value)} shard(s) in {os.path.dirname(value[0])}" if isinstance(value, list)
              else f"{name}: {value}")


if __name__ == "__main__":
    main()
