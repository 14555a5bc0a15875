"""LoRA and ReToken: closed-form weights, merge/remove, per-adapter scale, MultiheadAttention order, released layout."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE
from torch import nn
from torch.nn.utils import parametrize

from modules.lora import LoRA, ReToken, apply_lora, apply_retoken, remove_lora


def _randomise(loras):
    """Non-zero adapters (a fresh one is a zero update, which would hide every mistake)."""
    with torch.no_grad():
        for lora in loras:
            lora.lora_down.normal_()
            lora.lora_up.normal_(0, 0.5)


def _closed_form(weight, lora):
    delta = lora.scale * (lora.lora_up @ lora.lora_down).detach()  # out, in
    return weight + delta.view(*delta.shape, *[1] * (weight.dim() - 2))


class AttnBlock(nn.Module):
    """The naming StageC uses: an nn.MultiheadAttention at `attention.attn`."""

    def __init__(self, c=8, nhead=2):
        super().__init__()
        self.attention = nn.Module()
        self.attention.attn = nn.MultiheadAttention(c, nhead, batch_first=True)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        return self.proj(self.attention.attn(x, x, x, need_weights=False)[0])


def test_fresh_adapter_is_zero_update_as_upstream():
    layer = nn.Linear(5, 3)
    base = layer.weight.detach().clone()
    (lora,) = apply_lora(layer, rank=2)
    assert isinstance(lora, LoRA) and lora is layer.parametrizations.weight[0]
    assert torch.equal(lora.lora_down, torch.zeros(2, 5)) and lora.lora_up.abs().sum() > 0
    assert torch.equal(layer.weight, base)
    assert lora.scale == 1 / 2


@pytest.mark.parametrize("make,op", [
    (lambda: nn.Linear(6, 4), lambda m, w, x: F.linear(x, w, m.bias)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda m, w, x: F.conv2d(x, w, m.bias, padding=1)),
])
def test_linear_and_conv_equal_closed_form(make, op):
    model = nn.Sequential(make())
    untouched = copy.deepcopy(model)  # (parametrized modules cannot be deep-copied)
    x = torch.randn(2, 6) if isinstance(model[0], nn.Linear) else torch.randn(2, 3, 7, 7)
    base = model[0].weight.detach().clone()
    loras = apply_lora(model, rank=3, alpha=2)
    _randomise(loras)
    assert len(loras) == 1 and loras[0].scale == 2 / 3
    with torch.no_grad():
        expected = op(model[0], _closed_form(base, loras[0]), x)
        torch.testing.assert_close(model(x), expected)
        remove_lora(model, leave_parametrized=True)  # merge
        assert not parametrize.is_parametrized(model[0]) and isinstance(model[0].weight, nn.Parameter)
        torch.testing.assert_close(model(x), expected)

        _randomise(apply_lora(untouched, rank=3, alpha=2))
        remove_lora(untouched, leave_parametrized=False)
        assert torch.equal(untouched[0].weight, base)
        assert set(untouched.state_dict()) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("fast_path", [False, True])
def test_multihead_attention_order_and_closed_form(fast_path):
    model = AttnBlock()
    mha = model.attention.attn
    base_in, base_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    oracle = copy.deepcopy(model)
    loras = apply_lora(model, filters=[".attn"], rank=2)
    _randomise(loras)
    # module order, the released checkpoint's order: out_proj's adapter, then the fused in-projection's
    assert [tuple(lora.lora_up.shape) for lora in loras] == [(8, 2), (24, 2)]
    assert loras[0] is mha.out_proj.parametrizations.weight[0]
    assert loras[1] is mha.parametrizations.in_proj_weight[0]

    with torch.no_grad():
        oracle.attention.attn.in_proj_weight.copy_(_closed_form(base_in, loras[1]))
        oracle.attention.attn.out_proj.weight.copy_(_closed_form(base_out, loras[0]))
    x = torch.randn(2, 5, 8)
    model.train(not fast_path), oracle.train(not fast_path)
    with torch.no_grad():
        expected = oracle(x)
        torch.testing.assert_close(model(x), expected)
        remove_lora(model, leave_parametrized=True)
        torch.testing.assert_close(model(x), expected)


def test_adapters_get_gradients_base_stays_frozen():
    model = AttnBlock().requires_grad_(False)
    loras = apply_lora(model, filters=[".attn"], rank=2)
    _randomise(loras)
    model(torch.randn(2, 5, 8)).square().sum().backward()
    assert all(lora.lora_up.grad.abs().sum() > 0 and lora.lora_down.grad.abs().sum() > 0 for lora in loras)
    assert model.attention.attn.parametrizations.in_proj_weight.original.grad is None


def test_filters_and_skipped_tensors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 1))
    loras = apply_lora(model, rank=2)  # every module; LayerNorm's 1-D weight has no matrix to adapt
    assert [parametrize.is_parametrized(m, "weight") for m in model] == [True, False, True]
    assert len(loras) == 2
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    apply_lora(other, filters=["1"], rank=2)
    assert [parametrize.is_parametrized(m, "weight") for m in other] == [False, True]


def test_several_adapters_with_separate_scales():
    layer = nn.Linear(6, 4)
    base = layer.weight.detach().clone()
    (first,) = apply_lora(layer, rank=2)
    (second,) = apply_lora(layer, rank=3)  # stacked on the same weight
    _randomise([first, second])
    first.scale, second.scale = 0.7, -1.5
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = F.linear(x, _closed_form(_closed_form(base, first), second), layer.bias)
        torch.testing.assert_close(layer(x), expected)
        first.scale = second.scale = 0.0
        assert torch.equal(layer.weight, base)  # scale 0 is the base model, exactly


def test_remove_lora_leaves_other_parametrizations():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    parametrize.register_parametrization(model[0], "weight", Double())
    apply_lora(model, filters=["1"], rank=2)
    remove_lora(model)
    assert parametrize.is_parametrized(model[0], "weight") and not parametrize.is_parametrized(model[1], "weight")


@pytest.mark.parametrize("weights_dtype,autocast", [(torch.bfloat16, False), (torch.bfloat16, True),
                                                    (torch.float32, True)])
def test_bf16(weights_dtype, autocast):
    model = AttnBlock(c=16)
    loras = apply_lora(model, filters=[".attn"], rank=4)
    _randomise(loras)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        ref = model(x)
        model.to(weights_dtype)
        assert all(lora.lora_up.dtype == weights_dtype for lora in loras)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.to(weights_dtype))
    assert out.dtype == torch.bfloat16 or autocast
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_retoken_adds_deltas_to_chosen_rows_only():
    table = nn.Embedding(10, 6)
    base = table.weight.detach().clone()
    retoken = apply_retoken(table, indices=[3, 7])
    assert isinstance(retoken, ReToken) and retoken is table.parametrizations.weight[0]
    assert torch.equal(table.weight, base)  # zero deltas at start
    with torch.no_grad():
        retoken.embeddings.normal_()
    ids = torch.tensor([[3, 0, 7, 9]])
    with torch.no_grad():
        out = table(ids)
        torch.testing.assert_close(out[0, 0], base[3] + retoken.embeddings[0])
        torch.testing.assert_close(out[0, 2], base[7] + retoken.embeddings[1])
        assert torch.equal(out[0, 1], base[0]) and torch.equal(out[0, 3], base[9])
        untouched = [i for i in range(10) if i not in (3, 7)]
        assert torch.equal(table.weight[untouched], base[untouched])

    table.weight.sum().backward()
    assert torch.equal(retoken.embeddings.grad, torch.ones(2, 6))
    with torch.no_grad():
        expected = table.weight.clone()
    remove_lora(table, leave_parametrized=True)
    assert torch.equal(table.weight, expected)


def test_retoken_needs_indices():
    with pytest.raises(ValueError):
        ReToken()


def _layout(name):
    with open(os.path.join(REFERENCE, "checkpoint-layouts", f"{name}.json")) as f:
        return json.load(f)


def test_released_lora_layout_on_stage_c_3_6b():
    from modules.stage_c import StageC

    ref = _layout("lora_c_3.6b_rank4")
    with torch.device("meta"):
        stage_c = StageC()
        token_embedding = nn.Embedding(49408 + 2, 1280)  # CLIP bigG's table with two tokens added
    loras = apply_lora(stage_c, filters=ref["kwargs"]["filters"], rank=ref["kwargs"]["rank"])
    retoken = apply_retoken(token_embedding, indices=[49408, 49409])
    assert len(loras) == 128
    lora = nn.ModuleDict({"embeddings": retoken, "weights": nn.ModuleList(loras)})
    got = [(k, list(v.shape)) for k, v in lora.state_dict().items()]
    assert got == list(ref["state_dict"].items())  # keys, shapes and order
    assert sum(p.numel() for p in lora.parameters()) == ref["num_parameters"]


def test_small_stage_c_equals_closed_form():
    from modules.stage_c import StageC

    model = StageC(c_in=4, c_out=4, c_r=8, c_cond=16, c_hidden=[16, 16], nhead=[2, 2], blocks=[[1, 1], [1, 1]],
                   c_clip_text=8, c_clip_text_pooled=8, c_clip_img=8, c_clip_seq=2, dropout=[0, 0]).eval()
    with torch.no_grad():  # StageC zero-inits its output conv: random weights everywhere instead
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
    oracle, base = copy.deepcopy(model), copy.deepcopy(model)
    loras = apply_lora(model, filters=[".attn"], rank=3)
    _randomise(loras)

    paths = [name for name, m in oracle.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(paths) == 4 and len(loras) == 8
    with torch.no_grad():
        for i, path in enumerate(paths):
            mha, ours = oracle.get_submodule(path), model.get_submodule(path)
            out_lora, in_lora = loras[2 * i], loras[2 * i + 1]  # per block: out_proj, then in-projection
            assert out_lora is ours.out_proj.parametrizations.weight[0]
            assert in_lora is ours.parametrizations.in_proj_weight[0]
            mha.out_proj.weight.copy_(_closed_form(mha.out_proj.weight, out_lora))
            mha.in_proj_weight.copy_(_closed_form(mha.in_proj_weight, in_lora))

    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    conds = dict(sca=torch.rand(2), crp=torch.rand(2))
    with torch.no_grad():
        expected, base_out = oracle(*inputs, **conds), base(*inputs, **conds)
        assert (expected - base_out).abs().max() > 1e-2 * base_out.abs().max()  # the adapters matter
        torch.testing.assert_close(model(*inputs, **conds), expected)
        merged = copy.deepcopy(base)
        _randomise(apply_lora(merged, filters=[".attn"], rank=3))
        merged.load_state_dict(model.state_dict())  # same adapters
        remove_lora(merged, leave_parametrized=True)
        torch.testing.assert_close(merged(*inputs, **conds), expected)
        remove_lora(model, leave_parametrized=False)
        assert torch.equal(model(*inputs, **conds), base_out)
