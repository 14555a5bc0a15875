"""The one manager of training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `<directory>/step_<N>/` holding each model as safetensors (loadable on its own with
core.weights.load_model), `training_state.pt` (optimizers, schedulers and other global state, plus each rank's
RNG and data position) and `info.json`. It is written into a hidden temporary folder that is renamed into place
once complete, so a run killed while saving leaves only complete checkpoints behind and resumes from the last.
"""
import dataclasses
import io
import json
import os
import random
import re
import shutil
import tempfile
from typing import Callable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from . import distributed
from .config import EXPECTED_TRAIN, Config, ConfigError
from .weights import load_state_dict_file, save_state_dict_file

_NAME = re.compile(r"^step_(\d+)$")
_STATE_FILE = "training_state.pt"
_INFO_FILE = "info.json"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    save_every: int = EXPECTED_TRAIN  # updates between checkpoints; each replaces the previous one once written
    backup_every: int = EXPECTED_TRAIN  # checkpoints at multiples of this many updates are kept for good

    def __post_init__(self):
        super().__post_init__()
        for name in ("save_every", "backup_every"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """The process's global random generators (Python, NumPy, torch CPU and CUDA) as a Stateful."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict):
        random.setstate(_tuples(state["python"]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class CheckpointManager:
    """Saves and restores training checkpoints in `directory`; only the main process writes.

    Saving and loading are collective (every rank calls them): FSDP-sharded models and optimizers are gathered to
    full state dicts, and each rank's own state (`rank_states`) is stored per rank and restored to the same rank.
    """

    def __init__(self, directory: str, config: CheckpointConfig, env: distributed.DistEnv):
        self.directory = directory
        self.config = config
        self.env = env
        # Test seam: called with each file's path once it is written, before the checkpoint is complete.
        self.write_hook: Optional[Callable[[str], None]] = None

    def checkpoints(self) -> list:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = [(int(m.group(1)), os.path.join(self.directory, name))
                 for name in os.listdir(self.directory) if (m := _NAME.match(name))]
        return sorted(found)

    def latest(self) -> Optional[str]:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def due(self, step: int, last_step: int) -> bool:
        cfg = self.config
        return step % cfg.save_every == 0 or step % cfg.backup_every == 0 or step == last_step

    @staticmethod
    def read_info(path: str) -> dict:
        with open(os.path.join(path, _INFO_FILE), "r", encoding="utf-8") as f:
            return json.load(f)

    def save(self, step: int, info: Mapping, models: Mapping[str, nn.Module],
             optimizers: Mapping[str, tuple] = None, states: Mapping[str, Stateful] = None,
             rank_states: Mapping[str, Stateful] = None, metadata: Mapping[str, Mapping[str, str]] = None) -> str:
        """Writes checkpoint `step`; returns its folder.

        models: name -> module (DDP/FSDP or plain); optimizers: name -> (module its parameters belong to,
        optimizer); states: name -> Stateful equal on all ranks (rank 0's is saved); rank_states: name -> Stateful
        of each rank; metadata: name -> safetensors metadata of that model's file.
        """
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_states = {name: get_model_state_dict(m, options=full) for name, m in models.items()}
        optim_states = {name: get_optimizer_state_dict(m, opt, options=full)
                        for name, (m, opt) in (optimizers or {}).items()}
        # serialised here: tensors inside objects do not survive all_gather_object's pickling in this torch
        ranks = distributed.gather_objects(_to_bytes({name: s.state_dict() for name, s in (rank_states or {}).items()}))
        final = os.path.join(self.directory, f"step_{step:08d}")
        if self.env.is_main:
            os.makedirs(self.directory, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=self.directory)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the checkpoint from the user's group
            for name, state in model_states.items():
                file = os.path.join(tmp, f"{name}.safetensors")
                save_state_dict_file(state, file, metadata=(metadata or {}).get(name))
                self._written(file)
            training_state = {"optimizers": optim_states, "ranks": ranks,
                              "states": {name: s.state_dict() for name, s in (states or {}).items()}}
            self._write(os.path.join(tmp, _STATE_FILE), lambda f: torch.save(training_state, f))
            self._write(os.path.join(tmp, _INFO_FILE),
                        lambda f: f.write(json.dumps({**info, "step": step}, indent=2).encode()))
            if os.path.exists(final):  # the same step saved again: swap it for the new one
                os.replace(final, tempfile.mkdtemp(prefix=".replaced.", dir=self.directory))
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune(step)
        distributed.barrier()
        return final

    def load(self, path: str, models: Mapping[str, nn.Module], optimizers: Mapping[str, tuple] = None,
             states: Mapping[str, Stateful] = None, rank_states: Mapping[str, Stateful] = None) -> dict:
        """Restores what `save` wrote into the given objects (every rank reads the files); returns the info."""
        full = StateDictOptions(full_state_dict=True)
        for name, model in models.items():
            set_model_state_dict(model, load_state_dict_file(os.path.join(path, f"{name}.safetensors")), options=full)
        training_state = torch.load(os.path.join(path, _STATE_FILE), map_location="cpu", weights_only=True)
        for name, (model, optimizer) in (optimizers or {}).items():
            set_optimizer_state_dict(model, optimizer, training_state["optimizers"][name], options=full)
        for name, state in (states or {}).items():
            state.load_state_dict(training_state["states"][name])
        ranks = training_state["ranks"]
        if rank_states and len(ranks) != self.env.world_size:
            raise RuntimeError(f"{path} was written by {len(ranks)} processes, this run has {self.env.world_size}: "
                               f"per-process state ({', '.join(rank_states)}) cannot be restored")
        mine = torch.load(io.BytesIO(ranks[self.env.rank]), weights_only=True) if rank_states else {}
        for name, state in (rank_states or {}).items():
            state.load_state_dict(mine[name])
        return self.read_info(path)

    def _write(self, path: str, write: Callable):
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        self._written(path)

    def _written(self, path: str):
        if self.write_hook is not None:
            self.write_hook(path)

    def _prune(self, step: int):
        """Removes unfinished folders and older checkpoints that are not backups."""
        for name in os.listdir(self.directory):
            if name.startswith("."):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        for old, path in self.checkpoints():
            if old < step and old % self.config.backup_every != 0:
                shutil.rmtree(path, ignore_errors=True)


def _to_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
