"""LoRA adapters and trainable new-token embeddings, as torch parametrizations (the upstream LoRA trainer's way).

A parametrization recomputes `module.weight` from the frozen original at every access, so the base model's
code is unchanged and the adapters hold the only trainable parameters. Checkpoints store the adapters alone:
`ModuleDict({"embeddings": ReToken, "weights": ModuleList(LoRA modules in module order)})`.
"""
import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

_ADAPTED_TENSORS = ("weight", "in_proj_weight")  # in_proj_weight: nn.MultiheadAttention's fused q/k/v projection


class LoRA(nn.Module):
    """Low-rank update W + scale · (lora_up @ lora_down) of a layer's weight (Hu et al., arXiv:2106.09685).

    `scale` starts at alpha / rank; change it per adapter to mix several adapters, 0 gives the base weight.
    For a convolution the (out, in) update is shared by every kernel tap, as upstream, so the adapter's shapes
    depend only on the channel counts. Init as upstream: lora_down zeros, lora_up N(0, 1), a zero update.
    """

    def __init__(self, layer, name="weight", rank=16, alpha=1):
        super().__init__()
        weight = getattr(layer, name)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_down = nn.Parameter(torch.zeros(rank, weight.size(1), **kw))
        self.lora_up = nn.Parameter(torch.empty(weight.size(0), rank, **kw))
        nn.init.normal_(self.lora_up, mean=0.0, std=1.0)
        self.scale = alpha / rank

    def forward(self, weight):  # out, in[, kh, kw]
        delta = (self.lora_up @ self.lora_down) * self.scale  # out, in
        delta = delta.view(*delta.shape, *[1] * (weight.dim() - 2))  # broadcast over conv kernel taps
        return weight + delta.to(weight.dtype)


class ReToken(nn.Module):
    """Trainable deltas added to chosen rows (token ids) of an embedding table: new or re-learnt tokens.

    `embeddings` (n, dim) starts at zero, so the table is unchanged until trained; `indices` holds the ids.
    """

    def __init__(self, indices=None, dim=1280):
        super().__init__()
        if indices is None:
            raise ValueError("ReToken needs the token ids it trains")
        self.embeddings = nn.Parameter(torch.zeros(len(indices), dim))
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, table):  # vocab, dim
        return table.index_add(0, self.indices, self.embeddings.to(table.dtype))


def _adaptable(module, name):
    """Whether `module.<name>` is a stored parameter with ≥ 2 dims (matrix, conv kernel), adapted or not."""
    if parametrize.is_parametrized(module, name):
        tensor = module.parametrizations[name].original
    else:
        tensor = module._parameters.get(name)
    return tensor is not None and tensor.dim() >= 2


def apply_lora(model, filters=None, rank=16, alpha=1):
    """Adds a LoRA to every ≥2-D `weight`/`in_proj_weight` of the modules whose name contains one of `filters`
    (all modules if None); returns the new adapters in module order.

    Module order is the checkpoint order: for an nn.MultiheadAttention the `out_proj` adapter comes before the
    fused in-projection's, because the `parametrizations` container is registered after `out_proj`.
    A weight that already has adapters gets one more on top, so several LoRAs can be combined.
    """
    targets = [(module, name) for module_name, module in model.named_modules()
               if filters is None or any(f in module_name for f in filters)
               for name in _ADAPTED_TENSORS if _adaptable(module, name)]
    created = set()
    for module, name in targets:
        lora = LoRA(module, name, rank=rank, alpha=alpha)
        parametrize.register_parametrization(module, name, lora)
        created.add(lora)
    return [m for m in model.modules() if m in created]


def apply_retoken(module, indices=None):
    """Registers a ReToken on an embedding table (e.g. the CLIP text model's token_embedding) and returns it."""
    table = module.weight
    retoken = ReToken(indices, dim=table.size(1)).to(device=table.device, dtype=table.dtype)
    parametrize.register_parametrization(module, "weight", retoken)
    return retoken


@contextlib.contextmanager
def lora_disabled(adapters):
    """The weights `adapters` (LoRA modules) adapt are their base weights for the duration: scale 0 adds exact
    zeros. Their scales are restored afterwards, also after an error."""
    adapters = [a for a in adapters if isinstance(a, LoRA)]
    scales = [a.scale for a in adapters]
    try:
        for a in adapters:
            a.scale = 0.0
        yield
    finally:
        for a, scale in zip(adapters, scales):
            a.scale = scale


def remove_lora(model, leave_parametrized=True):
    """Removes every LoRA/ReToken parametrization in `model`.

    leave_parametrized=True folds the adapters into plain weights (merge for inference: no per-call cost);
    False restores the base weights exactly. Tensors with other parametrizations are left alone.
    """
    for module in list(model.modules()):
        for name in _ADAPTED_TENSORS:
            if parametrize.is_parametrized(module, name) and all(
                    isinstance(p, (LoRA, ReToken)) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)
