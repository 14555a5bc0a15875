"""The one checkpoint loader: model weights in and out of files, at the memory cost of one copy of the weights.

Models are built with their parameters on the meta device and the file's tensors are assigned to them one by one
(cast on the way), so a 3.6B Stage C never exists twice in memory. Safetensors files are read with plain reads into
fresh tensors rather than through safetensors' memory map: the mapped file counts towards the process's memory
until every tensor is gone, which makes a cast load cost 1.5x and a copied one 2x (measured with safetensors
0.8), and a mapped model crashes with SIGBUS if its file is rewritten in place. Files written here record the
model kind and preset/kwargs, so `load_model(path)` rebuilds the model from the file alone (the nanoGPT habit).
"""
import contextlib
import json
import os
import pickle
import uuid
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from modules import presets

DOWNLOAD_HINT = "the released weights come from `bash models/download_models.sh essential big-big bfloat16`"
_SAFETENSORS = (".safetensors",)
_PICKLES = (".pt", ".pth", ".ckpt", ".bin")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; a larger length field means a corrupt file
_RESERVED_METADATA = ("kind", "preset", "kwargs")
_LIST_LIMIT = 10
_CHUNK = 4 * 2**20  # bytes read at a time when casting


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file."""


def _listing(items):
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


class _Checkpoint:
    """An opened checkpoint: layout and metadata at once, tensors one at a time (so a caller can cast each)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._state = None  # the tensors of a pickle; safetensors are read lazily
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file; {DOWNLOAD_HINT}")
        ext = os.path.splitext(self.path)[1].lower()
        if ext in _SAFETENSORS:
            self._read_safetensors_header()
        elif ext in _PICKLES:
            self._load_pickle()
        else:
            raise CheckpointError(
                f"{self.path}: unsupported checkpoint format {ext or '(no extension)'!r}; expected .safetensors, "
                f"or {'/'.join(_PICKLES)} (read with torch.load(weights_only=True))")

    def _read_safetensors_header(self):
        path = self.path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, header length "
                                      f"{n})")
            try:
                header = json.loads(f.read(n))
                self.metadata = dict(header.pop("__metadata__", None) or {})
                self._entries = {}
                for name, info in header.items():
                    dtype, shape, (start, end) = _DTYPES[info["dtype"]], torch.Size(info["shape"]), info["data_offsets"]
                    if not 0 <= start <= end or end - start != shape.numel() * dtype.itemsize:
                        raise ValueError(f"{name}: data_offsets {[start, end]} do not fit {info['dtype']}{list(shape)}")
                    self._entries[name] = (dtype, shape, start, end)
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{path}: corrupt safetensors header ({_first_line(e)})") from None
        self._data_start = 8 + n
        need, have = max((e[3] for e in self._entries.values()), default=0), size - self._data_start
        if need > have:
            raise CheckpointError(f"{path}: truncated: its tensors need {need} bytes of data but the file holds "
                                  f"{have} (incomplete download or copy?)")
        self.shapes = {name: e[1] for name, e in self._entries.items()}
        self.dtypes = {name: e[0] for name, e in self._entries.items()}

    def _load_pickle(self):
        path = self.path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused: it pickles objects other than tensors and plain containers, and "
                                  f"unpickling those could run code ({_first_line(e)}); convert it to safetensors "
                                  f"where it is trusted") from None
        except Exception as e:  # a corrupt zip, a truncated file, the legacy format: one line, not a traceback
            raise CheckpointError(
                f"{path}: cannot read this checkpoint ({type(e).__name__}: {_first_line(e)})") from None
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]  # Lightning-style and upstream training checkpoints
        wrong = [f"{k!r} ({type(v).__name__})" for k, v in (state.items() if isinstance(state, Mapping) else [])
                 if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if not isinstance(state, Mapping) or wrong:
            found = _listing(wrong) if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(f"{path}: not a state dict of named tensors (found {found})")
        self._state, self.metadata = dict(state), {}
        self.shapes = {k: v.shape for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    def float_dtype(self):
        """The file's floating dtype when it has exactly one, else None."""
        found = {d for d in self.dtypes.values() if d.is_floating_point}
        return found.pop() if len(found) == 1 else None

    def tensors(self, dtype=None, device="cpu", names=None):
        """Yields (name, tensor) for `names` (default all), floating ones cast to `dtype`, each on `device` in turn."""
        def target(file_dtype):
            return dtype if dtype is not None and file_dtype.is_floating_point else file_dtype

        if self._state is not None:
            for name, t in self._state.items():
                if names is None or name in names:
                    yield name, t.to(device=device, dtype=target(t.dtype))
            return
        chunk = None
        with open(self.path, "rb", buffering=0) as f:
            for name, (file_dtype, shape, start, end) in sorted(self._entries.items(), key=lambda e: e[1][2]):
                if names is not None and name not in names:
                    continue
                f.seek(self._data_start + start)
                t = torch.empty(shape, dtype=target(file_dtype))
                if t.dtype == file_dtype:
                    self._read_into(f, t.view(-1).view(torch.uint8), name)
                else:  # cast through one reused buffer: a temporary per tensor fragments the heap (1.45x, measured)
                    chunk = torch.empty(_CHUNK, dtype=torch.uint8) if chunk is None else chunk
                    flat, step = t.view(-1), _CHUNK // file_dtype.itemsize
                    for i in range(0, flat.numel(), step):
                        part = chunk[: min(step, flat.numel() - i) * file_dtype.itemsize]
                        self._read_into(f, part, name)
                        flat[i:i + step].copy_(part.view(file_dtype))
                yield name, t.to(device)

    def _read_into(self, f, buffer, name):
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path}: truncated while reading {name} (was the file replaced?)")
            done += got


def load_state_dict_file(path, device="cpu", dtype=None):
    """A checkpoint file as {name: tensor}; floating tensors cast to `dtype` one at a time.

    Safetensors are read directly; pickles (.pt/.pth/.ckpt/.bin) only through torch.load(weights_only=True,
    mmap=True), which refuses anything that could run code; a state dict nested under 'state_dict' is unwrapped.
    """
    return dict(_Checkpoint(path).tensors(dtype, device))


def read_metadata(path):
    """The string metadata of a safetensors file (kind, preset, kwargs, and whatever the writer added)."""
    return _Checkpoint(path).metadata


def recorded_target(path, default="epsilon"):
    """What a generator file predicts (`gdf_target`), or what a ControlNet/LoRA file was trained against: files
    written here record it; released files do not, and theirs is `default` (epsilon)."""
    return read_metadata(path).get("gdf_target") or default


def objective_mismatch(path, predicts, what):
    """The error message when the ControlNet or LoRA file `path` was trained against a Stage C with another objective
    than `predicts` (what the Stage C it is applied to predicts), else None. Released files record none."""
    trained_for = read_metadata(path).get("gdf_target")
    if trained_for is None or trained_for == predicts:
        return None
    return (f"{path} was trained against a Stage C that predicts {trained_for}, but this Stage C predicts "
            f"{predicts}: retrain {what} on this Stage C with gdf_target: {predicts}")


def recorded_kind(path, default):
    """The model kind a file records, else `default`: files written here record theirs (the demo's 'effnet_lite0'
    where an EfficientNet is expected), the released files none."""
    return read_metadata(path).get("kind") or default


@contextlib.contextmanager
def _empty_parameters():
    """Parameters are created on the meta device, buffers for real.

    Unlike `with torch.device('meta')`, buffers keep the values their constructors compute; non-persistent ones
    are never in a checkpoint, so this is the only place their values can come from.
    """
    def to_meta(module, name, param):
        if param is None:  # e.g. Linear(bias=False)
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _layout_errors(model, ckpt, strict):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in ckpt.shapes]
    unexpected = [k for k in ckpt.shapes if k not in expected] if strict else []
    mismatched = [f"{k} (file {list(ckpt.shapes[k])}, model {list(shape)})"
                  for k, shape in expected.items() if k in ckpt.shapes and ckpt.shapes[k] != shape]
    return [f"{label} ({len(items)}): {_listing(items)}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if items]


def load_model(path, kind=None, preset=None, kwargs=None, dtype=None, device="cpu", strict=True):
    """Builds the model a checkpoint holds and fills it from the file, in eval mode.

    kind, preset and kwargs (overrides on top of the preset) default to what the file records; an explicit kind
    that differs from the recorded one ignores the recorded preset/kwargs. dtype defaults to the file's. With
    strict=False, tensors the model does not have are skipped; tensors it lacks are always an error, because the
    model is built without memory for them.
    """
    ckpt = _Checkpoint(path)
    recorded = ckpt.metadata.get("kind")
    kind = kind or recorded
    if kind is None:
        raise CheckpointError(f"{ckpt.path} does not record which model it holds: pass kind= and preset= "
                              f"(e.g. kind='stage_c', preset='3.6B'); kinds: {', '.join(presets.MODEL_CLASSES)}")
    if kind == recorded:
        preset = preset if preset is not None else ckpt.metadata.get("preset")
        if kwargs is None:
            try:
                kwargs = json.loads(ckpt.metadata.get("kwargs", "{}"))
            except ValueError as e:
                raise CheckpointError(f"{ckpt.path}: unreadable kwargs metadata ({_first_line(e)})") from None
    with _empty_parameters():
        model = presets.build_model(kind, preset, **(kwargs or {}))
    errors = _layout_errors(model, ckpt, strict)
    if recorded not in (None, kind):
        errors.append(f"the file records kind {recorded!r}")
    if errors:
        raise CheckpointError(f"{ckpt.path} does not fit {kind} (preset {preset!r}, kwargs {kwargs or {}}):\n  "
                              + "\n  ".join(errors))
    state = dict(ckpt.tensors(dtype, device, names=set(model.state_dict())))
    model.load_state_dict(state, strict=strict, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a parameter or buffer missing from state_dict(); a model defect, not a file one
        raise CheckpointError(f"{ckpt.path}: {kind} has tensors that no checkpoint can fill: {_listing(left)}")
    # Only moves what the file did not provide (non-persistent buffers); loaded tensors already match.
    model.to(device=device, dtype=dtype or ckpt.float_dtype())
    return model.eval()


@contextlib.contextmanager
def _atomic_open(path):
    """A file that appears at `path` complete or not at all: readers never see half a checkpoint."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_state_dict_file(state_dict, path, metadata=None, dtype=None):
    """Writes {name: tensor} as safetensors, atomically, one tensor at a time (no second copy of the model).

    Floating tensors are cast to `dtype` on the way; metadata is a {str: str} dict stored in the header.
    """
    header, offset = {}, 0
    for name, t in state_dict.items():
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: there is no data to save")
        out = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out not in _DTYPE_NAMES:
            raise ValueError(f"{name}: safetensors cannot store {out}")
        nbytes = t.numel() * out.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[out], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with _atomic_open(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t in state_dict.items():
            out = _DTYPES[header[name]["dtype"]]
            f.write(t.detach().to("cpu", out).contiguous().reshape(-1).view(torch.uint8).numpy())


def _registered_kind(model):
    path = f"{type(model).__module__}.{type(model).__qualname__}"
    return next((kind for kind, cls in presets.MODEL_CLASSES.items() if cls == path), None)


def model_metadata(model, kind=None, preset=None, kwargs=None):
    """The safetensors metadata ({kind, preset, kwargs} as strings) that lets load_model rebuild `model`.

    kind, preset and kwargs default to what `modules.presets.build_model` recorded on the model (kind also to the
    registry entry of its class); a model of an unregistered class (a LoRA, say) gets {}.
    """
    spec = getattr(model, "build_spec", None) or {}
    kind = kind or spec.get("kind") or _registered_kind(model)
    if kind is None:
        return {}
    if preset is None and kwargs is None and kind == spec.get("kind"):
        preset, kwargs = spec["preset"], spec["kwargs"]
    if preset is None and kwargs is None:
        raise ValueError(f"cannot record how to rebuild this {kind}: pass preset= or kwargs= ({{}} for the class "
                         f"defaults), or build it with modules.presets.build_model")
    presets.preset_kwargs(kind, preset)  # fail now, not when someone loads the file
    record = {"kind": kind, "kwargs": json.dumps(kwargs or {})}
    return {**record, "preset": preset} if preset is not None else record


def save_model(model, path, kind=None, preset=None, kwargs=None, dtype=None, metadata=None):
    """Saves a model's weights as safetensors with the record that rebuilds it (see model_metadata), atomically.

    `metadata` adds str entries of the caller's own (LoRA token strings, say); floating tensors are cast to `dtype`.
    """
    extra = dict(metadata or {})
    clash = [k for k in _RESERVED_METADATA if k in extra]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the model description")
    extra.update(model_metadata(model, kind, preset, kwargs))
    save_state_dict_file(model.state_dict(), path, metadata=extra, dtype=dtype)
