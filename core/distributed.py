"""Process groups, devices and model wrapping (DDP / FSDP), whatever launched us: torchrun, SLURM or nothing."""
import contextlib
import dataclasses
import functools
import os
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Config):
    use_fsdp: bool = False  # shard with FSDP instead of replicating with DDP (only with several processes)
    dist_backend: Optional[str] = None  # None: NCCL on CUDA, gloo otherwise


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """Ranks from torchrun's variables, else from SLURM's (one task per process), else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)))
    return DistEnv()


def default_device(env: DistEnv) -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is present, else the CPU."""
    return torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")


def init_process_group(env: DistEnv, device: torch.device, backend: Optional[str] = None, environ=os.environ):
    """Joins the process group when there are several processes: NCCL on CUDA, gloo otherwise, unless `backend`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.is_distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in environ:  # SLURM without torchrun: the node that ran srun hosts the rendezvous
        if "SLURM_LAUNCH_NODE_IPADDR" not in environ:
            raise RuntimeError("several processes but no MASTER_ADDR: launch with torchrun or set MASTER_ADDR")
        environ["MASTER_ADDR"] = environ["SLURM_LAUNCH_NODE_IPADDR"]
        environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                            rank=env.rank, world_size=env.world_size)


def teardown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates a tensor from all ranks along dim 0 (rank order)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, env: DistEnv, device: torch.device, use_fsdp: bool,
         wrap_classes: tuple = (), param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """DDP or FSDP (each `wrap_classes` instance its own FSDP unit) when distributed; the model itself otherwise.

    `param_dtype` sets FSDP's compute dtype (gradients are reduced in fp32).
    """
    if not env.is_distributed:
        return model
    if not use_fsdp:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for module in list(model.modules())[1:]:
        if isinstance(module, wrap_classes):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def grad_sync(models: Iterable[nn.Module], enabled: bool):
    """Gradient reduction on or off for the enclosed backward passes (off on all but the last accumulation step)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, DDP) and not enabled:
                stack.enter_context(model.no_sync())
            elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(enabled)
        yield


def apply_activation_checkpointing(model: nn.Module, classes: tuple):
    """Recomputes the activations of every `classes` block in the backward pass instead of storing them."""
    for module in model.modules():
        if isinstance(module, classes):
            module.forward = functools.partial(_checkpointed, module.forward)


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
