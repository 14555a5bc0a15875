"""The checkpoint loader: round trips, the file formats it accepts, the ones it refuses, its errors and its memory."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from conftest import ROOT
from core import weights
from core.weights import CheckpointError, load_model, load_state_dict_file, read_metadata, save_model
from modules import presets


class Toy(nn.Module):
    """Parameters, persistent buffers (one int64) and a non-persistent buffer no checkpoint holds."""

    def __init__(self, width=8, scale=2.0):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.register_buffer("freqs", torch.arange(width, dtype=torch.float32) * scale, persistent=False)

    def forward(self, x):
        return self.norm(self.lin(x)) * self.freqs


class Wide(nn.Module):
    """Big enough to measure memory: `depth` square Linear layers."""

    def __init__(self, width, depth):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(presets.MODEL_CLASSES, "toy", f"{__name__}.Toy")
    monkeypatch.setitem(presets.PRESETS, "toy", {"small": {"width": 4}})
    model = presets.build_model("toy", "small", scale=3.0)
    model.norm.running_mean.normal_()
    model.norm.running_var.uniform_(0.5, 2)
    model.norm.num_batches_tracked.fill_(7)
    return model.eval()


def test_round_trip_rebuilds_from_the_file_alone(toy, tmp_path):
    path = tmp_path / "toy.safetensors"
    save_model(toy, path)
    assert read_metadata(path) == {"kind": "toy", "preset": "small", "kwargs": '{"scale": 3.0}'}
    loaded = load_model(path)
    assert isinstance(loaded, Toy) and not loaded.training
    assert loaded.build_spec == toy.build_spec
    for (name, a), (_, b) in zip(toy.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # The non-persistent buffer is rebuilt by the constructor (with the recorded kwarg), not left on meta.
    assert torch.equal(loaded.freqs, torch.arange(4.0) * 3)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), toy(x))


def test_bf16_file_loads_in_its_own_dtype_or_the_requested_one(toy, tmp_path):
    path = tmp_path / "toy_bf16.safetensors"
    save_model(toy, path, dtype=torch.bfloat16)
    in_file = load_state_dict_file(path)
    assert {n for n, t in in_file.items() if t.dtype != torch.bfloat16} == {"norm.num_batches_tracked"}
    as_file = load_model(path)
    assert as_file.lin.weight.dtype == torch.bfloat16 and as_file.freqs.dtype == torch.bfloat16
    assert as_file.norm.num_batches_tracked.dtype == torch.int64 and as_file.norm.num_batches_tracked == 7
    as_fp32 = load_model(path, dtype=torch.float32)
    rounded = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in toy.state_dict().items()}
    for name, t in as_fp32.state_dict().items():
        assert t.dtype == toy.state_dict()[name].dtype and torch.equal(t, rounded[name]), name
    x = torch.randn(5, 4)
    torch.testing.assert_close(as_fp32(x), toy(x), rtol=2e-2, atol=2e-2)
    assert as_file(x.bfloat16()).dtype == torch.bfloat16


def test_files_are_interchangeable_with_the_safetensors_library(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(2).half(), "f64": torch.randn(2, 2, 2).double(),
        "i64": torch.arange(6).reshape(2, 3), "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    weights.save_state_dict_file(tensors, ours, metadata={"note": "hi"})
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, theirs, metadata={"note": "hi"})
    for got in (safetensors.torch.load_file(ours), load_state_dict_file(theirs), load_state_dict_file(ours)):
        assert got.keys() == tensors.keys()
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert read_metadata(theirs) == {"note": "hi"}
    with safetensors.safe_open(ours, "pt") as f:
        assert f.metadata() == {"note": "hi"}


def test_dtype_cast_touches_only_floating_tensors(tmp_path):
    path = tmp_path / "mixed.safetensors"
    weights.save_state_dict_file({"w": torch.randn(3), "n": torch.tensor(4)}, path)
    got = load_state_dict_file(path, dtype=torch.float16)
    assert got["w"].dtype == torch.float16 and got["n"].dtype == torch.int64


@pytest.mark.parametrize("nested", [False, True])
def test_pickles_load_through_weights_only(toy, tmp_path, nested):
    path = tmp_path / "toy.ckpt"
    state = toy.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if nested else state, path)
    loaded = load_model(path, kind="toy", preset="small", kwargs={"scale": 3.0})
    for name, t in state.items():
        assert torch.equal(loaded.state_dict()[name], t), name


class _Payload:
    """Unpickling this opens (creates) a file: the harmless stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    # Control: plain unpickling really runs the payload, so the assertions below can fail.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.bin"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, zipped)
    with open(legacy, "wb") as f:
        pickle.dump({"w": torch.zeros(2), "x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refused") as refused:
        load_state_dict_file(zipped)
    assert str(zipped) in str(refused.value)
    with pytest.raises(CheckpointError, match="cannot read") as legacy_error:
        load_state_dict_file(legacy)
    assert str(legacy) in str(legacy_error.value)
    assert not marker.exists()


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "training.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "step": 5}, path)
    with pytest.raises(CheckpointError, match=r"not a state dict.*'model' \(dict\), 'step' \(int\)"):
        load_state_dict_file(path)


def test_layout_errors_name_the_file_and_every_kind_of_mismatch(toy, tmp_path):
    state = toy.state_dict()
    state["lin.bias"] = torch.zeros(5)  # wrong shape
    state["extra.weight"] = state.pop("lin.weight")  # unexpected + missing
    path = tmp_path / "bad.safetensors"
    weights.save_state_dict_file(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path, kind="toy", preset="small")
    message = str(error.value)
    assert str(path) in message and "toy" in message
    assert "missing (1): lin.weight" in message
    assert "unexpected (1): extra.weight" in message
    assert "shape mismatch (1): lin.bias (file [5], model [4])" in message


def test_long_key_lists_are_truncated(toy, tmp_path):
    path = tmp_path / "many.safetensors"
    weights.save_state_dict_file({**toy.state_dict(), **{f"junk.{i}": torch.zeros(1) for i in range(25)}}, path)
    with pytest.raises(CheckpointError, match=r"unexpected \(25\): junk\.0, .*junk\.9, \.\.\. and 15 more$"):
        load_model(path, kind="toy", preset="small")


def test_strict_false_skips_unexpected_keys_but_not_missing_ones(toy, tmp_path):
    path = tmp_path / "extra.safetensors"
    weights.save_state_dict_file({**toy.state_dict(), "junk": torch.zeros(1)}, path)
    loaded = load_model(path, kind="toy", preset="small", strict=False)
    assert torch.equal(loaded.lin.weight, toy.lin.weight)
    state = toy.state_dict()
    del state["lin.bias"]
    weights.save_state_dict_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): lin\.bias"):
        load_model(path, kind="toy", preset="small", strict=False)


class DerivedBuffer(nn.Module):
    """A non-persistent buffer computed from a parameter: built on meta, nothing can ever fill it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", self.lin.weight.detach().abs().sum(), persistent=False)


def test_tensors_left_on_meta_are_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(presets.MODEL_CLASSES, "derived", f"{__name__}.DerivedBuffer")
    path = tmp_path / "derived.safetensors"
    save_model(DerivedBuffer(), path, kwargs={})
    with pytest.raises(CheckpointError, match=r"derived has tensors that no checkpoint can fill: scale$"):
        load_model(path)


def test_explicit_arguments_override_the_recorded_ones(toy, tmp_path):
    path = tmp_path / "toy.safetensors"
    save_model(toy, path)
    assert torch.equal(load_model(path, kwargs={"scale": 5.0}).freqs, torch.arange(4.0) * 5)
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        load_model(path, kwargs={"width": 3})  # the recorded preset still applies, the kwargs override it
    with pytest.raises(CheckpointError, match=r"(?s)does not fit previewer \(preset None.*records kind 'toy'"):
        load_model(path, kind="previewer")  # another kind: the recorded preset and kwargs do not apply


def test_a_file_without_a_model_record_needs_a_kind(toy, tmp_path):
    path = tmp_path / "bare.safetensors"
    weights.save_state_dict_file(toy.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pass kind= and preset=.*stage_c"):
        load_model(path)
    assert isinstance(load_model(path, kind="toy", preset="small"), Toy)


def test_truncated_and_corrupt_files_give_one_line_errors(toy, tmp_path):
    good = tmp_path / "good.safetensors"
    save_model(toy, good)
    data = good.read_bytes()
    cases = {
        "cut_data.safetensors": (data[:-10], "truncated: its tensors need"),
        "cut_header.safetensors": (data[:40], "truncated or not a safetensors file"),
        "tiny.safetensors": (b"\x01", "truncated or not a safetensors file"),
        "garbage_header.safetensors": (len(b"{not json}").to_bytes(8, "little") + b"{not json}", "corrupt"),
        "bad_dtype.safetensors": (data.replace(b'"F32"', b'"F99"', 1), "corrupt"),
    }
    pt = tmp_path / "good.pt"
    torch.save(toy.state_dict(), pt)
    cases["cut.pt"] = (pt.read_bytes()[: len(pt.read_bytes()) // 2], "cannot read")
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            load_model(path, kind="toy", preset="small")
        message = str(error.value)
        assert expected in message and str(path) in message and "\n" not in message, (name, message)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: no such file.*download_models\.sh essential"):
        load_state_dict_file(tmp_path / "nothere.safetensors")
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint format '\.npz'"):
        load_state_dict_file(path)


def test_save_is_atomic(toy, tmp_path, monkeypatch):
    path = tmp_path / "toy.safetensors"
    path.write_bytes(b"previous checkpoint")

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(weights.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model(toy, path)
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["toy.safetensors"]


def test_save_model_records_enough_to_rebuild_or_says_why_not(toy, tmp_path):
    bare = Toy(width=4)  # a registered class built directly: save_model cannot know its kwargs
    with pytest.raises(ValueError, match="pass preset= or kwargs="):
        save_model(bare, tmp_path / "a.safetensors")
    assert weights.model_metadata(toy) == {"kind": "toy", "preset": "small", "kwargs": '{"scale": 3.0}'}
    save_model(bare, tmp_path / "b.safetensors", kwargs={"width": 4})
    assert read_metadata(tmp_path / "b.safetensors") == {"kind": "toy", "kwargs": '{"width": 4}'}
    with pytest.raises(ValueError, match="unknown preset 'huge' for toy"):
        save_model(bare, tmp_path / "c.safetensors", preset="huge")
    with pytest.raises(ValueError, match="reserved"):
        save_model(toy, tmp_path / "d.safetensors", metadata={"kind": "x"})
    lora_like = nn.ModuleDict({"down": nn.Linear(2, 1, bias=False)})  # unregistered: weights and metadata only
    save_model(lora_like, tmp_path / "e.safetensors", metadata={"tokens": '["[fernando]"]'})
    assert read_metadata(tmp_path / "e.safetensors") == {"tokens": '["[fernando]"]'}
    assert torch.equal(load_state_dict_file(tmp_path / "e.safetensors")["down.weight"], lora_like.down.weight)


def _stage_inputs(kind, b=2):
    r = torch.rand(b)
    if kind == "stage_c":
        return (torch.randn(b, 16, 8, 8), r, torch.randn(b, 77, presets.TINY_CLIP_TEXT_DIM),
                torch.randn(b, 1, presets.TINY_CLIP_TEXT_POOLED_DIM), torch.randn(b, 1, presets.TINY_CLIP_IMAGE_DIM))
    return torch.randn(b, 4, 16, 16), r, torch.randn(b, 16, 4, 4), torch.randn(b, 1, presets.TINY_CLIP_TEXT_POOLED_DIM)


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
@torch.no_grad()
def test_real_models_round_trip_in_fp32_and_bf16(kind, tmp_path):
    model = presets.build_model(kind, "tiny")
    for p in model.parameters():  # the zero-initialised output layer would make every comparison trivial
        p.add_(torch.randn_like(p), alpha=0.05)
    model.eval()
    inputs = _stage_inputs(kind)
    expected = model(*inputs)
    save_model(model, tmp_path / "fp32.safetensors")
    save_model(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert torch.equal(load_model(tmp_path / "fp32.safetensors")(*inputs), expected)
    bf16 = load_model(tmp_path / "bf16.safetensors")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16(*inputs), model.to(torch.bfloat16)(*inputs))  # same weights, same dtype: same output
    upcast = load_model(tmp_path / "bf16.safetensors", dtype=torch.float32)(*inputs)
    torch.testing.assert_close(upcast, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


_MEASURE = """
import json, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from modules import presets
presets.MODEL_CLASSES["wide"] = "test_weights.Wide"
from core.weights import load_model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status("VmRSS")
model = load_model({path!r}, dtype=getattr(torch, {dtype!r}))
print(json.dumps({{"growth": status("VmHWM") - before, "bytes": sum(t.nbytes for t in model.state_dict().values())}}))
"""


def test_loading_costs_about_one_copy_of_the_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(presets.MODEL_CLASSES, "wide", f"{__name__}.Wide")
    path = tmp_path / "wide.safetensors"
    model = presets.build_model("wide", width=2176, depth=16)  # 75.8M parameters: 303 MB in fp32
    save_model(model, path)
    del model
    size = os.path.getsize(path)
    assert size > 300e6
    for dtype, loaded_bytes in (("float32", size), ("bfloat16", size / 2)):
        script = _MEASURE.format(root=ROOT, tests=os.path.dirname(__file__), path=str(path), dtype=dtype)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        measured = json.loads(result.stdout)
        assert measured["bytes"] == pytest.approx(loaded_bytes, rel=0.01)
        assert measured["growth"] <= 1.3 * loaded_bytes, (dtype, measured, size)
