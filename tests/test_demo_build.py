"""The demo build's stage bookkeeping (demo/build_model.py), with every stage replaced by a recorder: a killed
stage resumes from its checkpoints, a redone one (--from) starts from nothing, and new data discards every cache
and checkpoint made from the old data."""
import os

import pytest
import yaml

from demo import build_model


@pytest.fixture
def build(tmp_path, monkeypatch):
    """A repository in tmp_path with the demo training configs' run folders, and stages that record each call and
    what was on disk at that moment."""
    monkeypatch.setattr(build_model, "REPO", str(tmp_path))
    os.makedirs(tmp_path / "configs" / "training")
    for config in build_model.TRAINED.values():
        with open(tmp_path / "configs" / "training" / f"demo_{config}.yaml", "w") as f:
            yaml.safe_dump({"checkpoint_path": "outputs/demo/checkpoints", "experiment_id": f"demo_{config}",
                            "updates": 10}, f)
    calls = []

    def stage(name, product):
        def run():
            run_folder = build_model._run_folder(build_model.TRAINED[name]) if name in build_model.TRAINED else None
            calls.append((name, run_folder is not None and os.path.isdir(run_folder)))
            if name in build_model.TRAINED:  # a trainer leaves its checkpoints behind
                os.makedirs(os.path.join(run_folder, "step_00000010"), exist_ok=True)
            if name.startswith("cache_"):
                os.makedirs(tmp_path / product[1], exist_ok=True)
            else:
                (tmp_path / build_model.OUT / product).write_text("done")
        return run

    monkeypatch.setattr(build_model, "STAGES", [(n, p, stage(n, p)) for n, p, _ in build_model.STAGES])
    return tmp_path, calls


def test_a_killed_stage_resumes_and_a_redone_one_starts_over(build):
    root, calls = build
    build_model.main(["--until", "stage_b"])
    assert [c[0] for c in calls] == ["data", "stage_a", "previewer", "cache_b", "stage_b"]
    # stage_b was killed before its export: its checkpoints are kept for the trainer to resume from
    os.remove(root / build_model.OUT / "stage_b.safetensors")
    calls.clear()
    build_model.main(["--until", "stage_b"])
    assert calls == [("stage_b", True)]
    # --from stage_b: the finished run is discarded, or the trainer would resume it and export it again
    calls.clear()
    build_model.main(["--from", "stage_b", "--until", "stage_b"])
    assert calls == [("stage_b", False)]


def test_new_data_discards_the_caches_and_checkpoints_made_from_the_old(build):
    root, calls = build
    build_model.main(["--until", "cache_c"])
    assert os.path.isdir(root / build_model.CACHE_C) and os.path.isdir(build_model._run_folder("a"))
    # new data (its exported prompts removed, as after a change to the scenes): nothing downstream survives
    for name in os.listdir(root / build_model.OUT):
        os.remove(root / build_model.OUT / name)
    calls.clear()
    build_model.main(["--until", "cache_c"])
    assert [c[0] for c in calls] == ["data", "stage_a", "previewer", "cache_b", "stage_b", "cache_c"]
    assert not any(resumed for _, resumed in calls)
