"""Stage B and Stage C against the released layouts (built on the meta device) and against diffusers'
StableCascadeUNet as an independent oracle (same weights via diffusers' own single-file converter)."""
import copy
import inspect
import json
import os

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers
from diffusers.models.unets.unet_stable_cascade import GlobalResponseNorm as DiffusersGRN
from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock, StableCascadeUNet
from torch.nn.utils import parametrize

import modules.common
from benchmarks.common import diffusers_config
from conftest import REFERENCE
from modules.common import AttnBlock, BlockContext, FeedForwardBlock, GlobalResponseNorm
from modules.stage_b import StageB
from modules.stage_c import StageC

PRESETS = {"stage_b_3b": StageB, "stage_b_700m": StageB, "stage_c_3.6b": StageC, "stage_c_1b": StageC}


def layout(name):
    with open(os.path.join(REFERENCE, "checkpoint-layouts", f"{name}.json")) as f:
        return json.load(f)


def all_kwargs(cls, kwargs):
    bound = inspect.signature(cls).bind(**kwargs)
    bound.apply_defaults()
    return bound.arguments


def diffusers_twin(model, kwargs):
    """diffusers' StableCascadeUNet with our model's weights, converted by diffusers' own converter."""
    config = diffusers_config(type(model), kwargs)
    twin = StableCascadeUNet(**config).eval()
    twin.load_state_dict(convert_stable_cascade_unet_single_file_to_diffusers(model.state_dict()), strict=True)
    return twin


@torch.no_grad()
def randomise(model, seed=0):
    """Every parameter random (the default init zeroes the output conv, timestep maps and GRN): normal with a
    per-tensor std, ~1/sqrt(fan_in) for matrices and small for vectors."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = 0.5 + torch.rand((), generator=g).item()
        std = 0.1 * scale if p.numel() == p.shape[-1] or p.dim() == 1 else scale * (p[0].numel()) ** -0.5
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def stage_c_inputs(kw, batch, h, w, t_conds=True, g=None):
    k = all_kwargs(StageC, kw)
    inputs = dict(x=torch.randn(batch, k["c_in"], h, w), r=torch.rand(batch),
                  clip_text=torch.randn(batch, 77, k["c_clip_text"]),
                  clip_text_pooled=torch.randn(batch, 1, k["c_clip_text_pooled"]),
                  clip_img=torch.randn(batch, 1, k["c_clip_img"]))
    if t_conds:
        inputs.update(sca=torch.rand(batch), crp=torch.rand(batch))
    return inputs


def stage_b_inputs(kw, batch, h, w, pixels=True, sca=True):
    k = all_kwargs(StageB, kw)
    inputs = dict(x=torch.randn(batch, k["c_in"], h, w), r=torch.rand(batch),
                  effnet=torch.randn(batch, k["c_effnet"], 5, 7), clip=torch.randn(batch, 1, k["c_clip"]))
    if pixels:
        inputs["pixels"] = torch.rand(batch, k["c_pixels"], 9, 9)
    if sca:
        inputs["sca"] = torch.rand(batch)
    return inputs


def run_diffusers(twin, model, inputs):
    i = dict(inputs)
    if isinstance(model, StageC):
        return twin(i.pop("x"), i.pop("r"), i.pop("clip_text_pooled"), clip_text=i.pop("clip_text"),
                    clip_img=i.pop("clip_img"), **i).sample
    return twin(i.pop("x"), i.pop("r"), i.pop("clip"), **i).sample


def assert_parity(ours, ref):
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert scale > 1e-2, "degenerate output: the comparison would prove nothing"
    assert (ours - ref).abs().max() <= 1e-4 * scale


# ---------------------------------------------------------------- layouts and full-size forwards (meta)

@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_released_layout(name):
    ref = layout(name)
    with torch.device("meta"):
        model = PRESETS[name](**ref["kwargs"])
    sd = model.state_dict()
    assert list(sd) == list(ref["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_on_meta_at_native_resolution(name):
    ref = layout(name)
    with torch.device("meta"):
        model = PRESETS[name](**ref["kwargs"]).eval()
        if PRESETS[name] is StageC:  # 1024²: 16×24×24 latents
            c_cond = all_kwargs(StageC, ref["kwargs"])["c_cond"]
            out = model(torch.empty(2, 16, 24, 24), torch.rand(2), torch.empty(2, 77, 1280), torch.empty(2, 1280),
                        torch.empty(2, 1, 768), cnet=[torch.empty(2, c_cond, 32, 32), None] * 4, sca=torch.rand(2))
            assert out.shape == (2, 16, 24, 24)
        else:  # 1024²: 4×256×256 Stage A latents, 16×24×24 EfficientNet latents
            out = model(torch.empty(2, 4, 256, 256), torch.rand(2), torch.empty(2, 16, 24, 24),
                        torch.empty(2, 1, 1280))
            assert out.shape == (2, 4, 256, 256)
    assert out.device.type == "meta"


# ---------------------------------------------------------------- parity with diffusers (fp32)

@pytest.fixture(params=["whole maps", "one row per block", "one sample per block"])
def row_blocks(request, monkeypatch):
    """On CPU the channel MLPs run big maps in blocks of rows, and batches of small maps in blocks of samples; a
    tiny block size makes the small test maps take the first path (one row per block), a patched block count
    the second (one sample per block)."""
    if request.param == "one sample per block":
        monkeypatch.setattr(modules.common, "_row_blocks", lambda x, width: x.size(0))
    if request.param == "one row per block":
        monkeypatch.setattr(modules.common, "_CACHE_BLOCK", 1)
        monkeypatch.setattr(modules.common, "_MIN_BLOCK_PIXELS", 1)
        assert modules.common._row_blocks(torch.empty(2, 3, 5, 4), 16) == 3
    return request.param


SMALL_C = [
    dict(c_hidden=[32, 48], nhead=[-1, 4], c_cond=24, blocks=[[2, 2], [2, 1]], block_repeat=[[1, 2], [2, 3]],
         level_config=["CT", "CTA"], c_clip_text=20, c_clip_text_pooled=12, c_clip_img=10, switch_level=[True]),
    dict(c_hidden=[32, 32], nhead=[2, 2], c_cond=16, c_r=32, blocks=[[1, 2], [2, 1]], c_clip_text=8,
         c_clip_text_pooled=8, c_clip_img=8, c_clip_seq=2, self_attn=[False, True], t_conds=["sca"], patch_size=2),
]
SMALL_B = [
    dict(c_hidden=[16, 24, 32], nhead=[-1, 2, 4], c_cond=20, blocks=[[1, 2, 1], [1, 2, 1]],
         block_repeat=[[1, 1, 2], [2, 1, 3]], level_config=["CT", "CTA", "CTA"], c_clip=12, c_effnet=6,
         dropout=[0, 0.1, 0.1]),
]


@pytest.mark.parametrize("kw", SMALL_C)
def test_stage_c_small_matches_diffusers(kw, row_blocks):
    model = randomise(StageC(**kw))
    twin = diffusers_twin(model, kw)
    inputs = stage_c_inputs(kw, batch=2, h=14, w=10, t_conds=False)  # odd sizes after ×½ exercise the skip resize
    with torch.no_grad():
        assert_parity(model(**inputs), run_diffusers(twin, model, inputs))
        one = {k: v[:1] for k, v in stage_c_inputs(kw, batch=1, h=8, w=6).items()}  # diffusers: sca/crp batch 1
        assert_parity(model(**one), run_diffusers(twin, model, one))


@pytest.mark.parametrize("kw", SMALL_B)
@pytest.mark.parametrize("pixels", [True, False])
def test_stage_b_small_matches_diffusers(kw, pixels, row_blocks):
    model = randomise(StageB(**kw))
    twin = diffusers_twin(model, kw)
    inputs = stage_b_inputs(kw, batch=2, h=22, w=26, pixels=pixels, sca=False)  # 11×13 -> 5×6 -> 2×3
    with torch.no_grad():
        assert_parity(model(**inputs), run_diffusers(twin, model, inputs))
        one = stage_b_inputs(kw, batch=1, h=16, w=12, pixels=pixels)
        assert_parity(model(**one), run_diffusers(twin, model, one))


NARROW = {  # each released preset's depth and level structure, at a width the CPU runs in milliseconds
    "stage_b_3b": dict(c_hidden=[8, 16, 24, 24], nhead=[-1, -1, 2, 2], c_cond=16, c_clip=12),
    "stage_b_700m": dict(c_hidden=[8, 16, 24, 24], nhead=[-1, 2, 2, 2], c_cond=16, c_clip=12),
    "stage_c_3.6b": dict(c_hidden=[24, 24], nhead=[2, 2], c_cond=16, c_clip_text=12, c_clip_text_pooled=10,
                         c_clip_img=8),
    "stage_c_1b": dict(c_hidden=[24, 24], nhead=[3, 3], c_cond=16, c_clip_text=12, c_clip_text_pooled=10,
                       c_clip_img=8),
}


@pytest.mark.parametrize("name", NARROW)
def test_preset_depth_matches_diffusers(name):
    kw = {**layout(name)["kwargs"], **NARROW[name]}
    cls = PRESETS[name]
    structure = ("blocks", "block_repeat", "level_config") + (("switch_level",) if cls is StageC else ())
    for key in structure:  # the structure really is the preset's
        assert all_kwargs(cls, kw)[key] == all_kwargs(cls, layout(name)["kwargs"])[key]
    model = randomise(cls(**kw))
    twin = diffusers_twin(model, kw)
    inputs = stage_c_inputs(kw, 1, 8, 8) if cls is StageC else stage_b_inputs(kw, 1, 32, 32, pixels=False)
    with torch.no_grad():
        assert_parity(model(**inputs), run_diffusers(twin, model, inputs))


@pytest.mark.parametrize("cls", [StageB, StageC])
def test_gradients_match_diffusers(cls, row_blocks):
    """Training goes through the same code: every parameter's gradient equals diffusers' (dropout off)."""
    kw = SMALL_C[0] if cls is StageC else SMALL_B[0]
    model = randomise(cls(**kw))
    twin = diffusers_twin(model, kw)
    inputs = stage_c_inputs(kw, 2, 8, 6, t_conds=False) if cls is StageC else stage_b_inputs(kw, 2, 16, 12, sca=False)
    target = torch.randn_like(inputs["x"])
    ((model(**inputs) - target) ** 2).mean().backward()
    ((run_diffusers(twin, model, inputs) - target) ** 2).mean().backward()
    ours = convert_stable_cascade_unet_single_file_to_diffusers({k: p.grad for k, p in model.named_parameters()})
    theirs = dict(twin.named_parameters())
    scale = max(g.abs().max() for g in ours.values())
    assert set(ours) == set(theirs)
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs[key].grad, rtol=1e-3, atol=1e-5 * scale, msg=key)


def test_pooled_embeddings_may_be_2d():
    """Upstream (and diffusers) ignore the unsqueezed 2-D pooled text; here B×c and B×1×c agree."""
    kw = SMALL_C[0]
    model = randomise(StageC(**kw))
    inputs = stage_c_inputs(kw, 2, 8, 8)
    flat = dict(inputs, clip_text_pooled=inputs["clip_text_pooled"][:, 0], clip_img=inputs["clip_img"][:, 0])
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**flat))
    kw = SMALL_B[0]
    model = randomise(StageB(**kw))
    inputs = stage_b_inputs(kw, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**dict(inputs, clip=inputs["clip"][:, 0])))


def test_layout_attention_adds_a_map_of_the_prompt_that_depends_on_the_place_alone():
    """layout_attention (for the demo, off in the released models): the grid runs from -1 at the top/left to 1 at the
    bottom/right; a new model is exactly the plain one (zero output projection); with its weights set, what it adds
    to the input embedding is torch's own multi-head attention from MLP(y, x) queries to the mapped conditioning
    tokens, whatever the latents."""
    from modules.stage_c import coordinate_grid
    grid = coordinate_grid(torch.zeros(1, 5, 3, 4))
    assert grid.shape == (1, 2, 3, 4)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(grid[0, 1, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    kw = SMALL_C[0]
    plain = randomise(StageC(**kw))
    placed = StageC(**kw, layout_attention=2).eval()
    assert not any(k.startswith("layout") for k in plain.state_dict())  # the released layouts are unchanged
    missing = placed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("layout_attention.") for k in missing)
    inputs = stage_c_inputs(kw, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(placed(**inputs), plain(**inputs))
        layout = placed.layout_attention
        for p in layout.parameters():
            p.normal_(0, 0.3)
        added = []
        hook = layout.register_forward_hook(lambda module, args, out: added.append(out))
        placed(**inputs)
        placed(**dict(inputs, x=torch.randn_like(inputs["x"])))
        hook.remove()
        torch.testing.assert_close(added[0], added[1])  # the latents do not enter it
        clip = placed.gen_c_embeddings(inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"])
        queries = layout.query(coordinate_grid(added[0]))  # 1, C, H, W
        tokens = queries.flatten(2).transpose(1, 2).expand(2, -1, -1)  # B, HW, C
        kv = layout.kv_mapper(clip)
        expected, _ = layout.attention.attn(tokens, kv, kv, need_weights=False)
        torch.testing.assert_close(added[0], expected.transpose(1, 2).unflatten(2, added[0].shape[-2:]))
        assert not torch.allclose(added[0][0], added[0][1])  # two prompts, two maps
        assert not torch.allclose(placed(**inputs), plain(**inputs))


def test_controlnet_residuals_match_diffusers_with_hooks():
    """cnet[i] is added (bilinear, align_corners=True, resized) to the input of the i-th ResBlock call, counting
    down then up path and every repeat; None skips a block, a short list leaves the rest alone."""
    kw = dict(SMALL_C[0], switch_level=[False], block_repeat=[[2, 1], [1, 2]])
    model = randomise(StageC(**kw))
    twin = diffusers_twin(model, kw)
    n_res = 2 * 2 + 2 * 1 + 2 * 1 + 1 * 2  # down: 2 layers × 2 repeats, 2 × 1; up (deepest first): 2 × 1, 1 × 2
    cnet = [torch.randn(2, 32 if i < 4 or i >= 8 else 48, 5, 4) if i % 3 else None for i in range(n_res - 1)]
    calls = []

    def add_residual(module, args):
        i = len(calls)
        calls.append(i)
        if i < len(cnet) and cnet[i] is not None:
            x = args[0]
            res = torch.nn.functional.interpolate(cnet[i], size=x.shape[-2:], mode="bilinear", align_corners=True)
            return (x + res,) + args[1:]

    for m in twin.modules():
        if isinstance(m, SDCascadeResBlock):
            m.register_forward_pre_hook(add_residual)
    inputs = stage_c_inputs(kw, 2, 7, 9, t_conds=False)
    with torch.no_grad():
        ref = run_diffusers(twin, model, inputs)
        ours = model(**inputs, cnet=cnet)
        assert len(calls) == n_res
        assert_parity(ours, ref)
        assert (ours - model(**inputs)).abs().max() > 1e-2 * ref.abs().max()  # the residuals did something


# ---------------------------------------------------------------- blocks

def test_attention_equals_multihead_attention_and_honours_parametrizations():
    """The SDPA path computes what nn.MultiheadAttention computes (upstream's call), and reads in_proj_weight /
    out_proj.weight at call time, so a parametrization on them (LoRA) changes the output like edited weights."""
    block = randomise(AttnBlock(24, 16, nhead=3))
    x, clip = torch.randn(2, 24, 5, 6), torch.randn(2, 7, 16)
    with torch.no_grad():
        norm_x = block.norm(x).flatten(2).transpose(1, 2)
        kv = torch.cat([norm_x, block.kv_mapper(clip)], dim=1)
        expected = x + block.attention.attn(norm_x, kv, kv, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
        assert torch.allclose(block(x, BlockContext(None, clip)), expected, atol=1e-5)

    class AddDelta(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.delta = torch.nn.Parameter(torch.randn(shape) * 0.1)

        def forward(self, w):
            return w + self.delta

    edited = copy.deepcopy(block)
    attn = block.attention.attn
    parametrize.register_parametrization(attn, "in_proj_weight", AddDelta(attn.in_proj_weight.shape))
    parametrize.register_parametrization(attn.out_proj, "weight", AddDelta(attn.out_proj.weight.shape))
    with torch.no_grad():
        edited.attention.attn.in_proj_weight.copy_(attn.in_proj_weight)
        edited.attention.attn.out_proj.weight.copy_(attn.out_proj.weight)
        ours = block(x, BlockContext(None, clip))
        assert torch.allclose(ours, edited(x, BlockContext(None, clip)), atol=1e-5)
        assert not torch.allclose(ours, expected, atol=1e-3)


def test_global_response_norm_matches_diffusers():
    ours = randomise(GlobalResponseNorm(12))
    theirs = DiffusersGRN(12)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 7, 12)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_feed_forward_block_is_resblock_mlp_without_depthwise():
    ff = randomise(FeedForwardBlock(16))
    res = SDCascadeResBlock(16).eval()
    with torch.no_grad():
        res.depthwise.weight.zero_()
        res.depthwise.weight[:, 0, 1, 1] = 1  # identity depthwise conv
        res.depthwise.bias.zero_()
        res.channelwise.load_state_dict(ff.channelwise.state_dict())
        x = torch.randn(2, 16, 5, 7)
        assert torch.allclose(ff(x), res(x), atol=1e-5)


# ---------------------------------------------------------------- bf16 and autocast (SPEC §7)

@pytest.mark.parametrize("cls", [StageB, StageC])
def test_bf16_weights_run_with_and_without_autocast(cls):
    kw = SMALL_C[0] if cls is StageC else SMALL_B[0]
    model = randomise(cls(**kw))
    inputs = stage_c_inputs(kw, 2, 8, 8) if cls is StageC else stage_b_inputs(kw, 2, 16, 16)
    if cls is StageC:  # fp32 ControlNet residuals into a bf16 model
        inputs["cnet"] = [torch.randn(2, 32, 4, 4) * 0.1, None, torch.randn(2, 48, 8, 8) * 0.1]
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(**inputs)
        runs = {
            "bf16 weights, fp32 inputs": half(**inputs),
            # noise levels stay fp32: in bf16, r · 10000 would lose the embedding's phase, whatever the model does
            "bf16 weights and inputs": half(**{k: v.bfloat16() if k in ("x", "clip", "effnet", "pixels", "clip_text",
                                                                         "clip_text_pooled", "clip_img") else v
                                               for k, v in inputs.items()}),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs["bf16 weights, autocast"] = half(**inputs)
            runs["fp32 weights, autocast"] = model(**inputs)
    for name, out in runs.items():
        assert torch.isfinite(out).all(), name
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max(), name
    assert runs["bf16 weights, fp32 inputs"].dtype == torch.bfloat16


def test_grn_gradient_is_finite_on_an_all_zero_channel():
    from modules.common import GlobalResponseNorm
    grn = GlobalResponseNorm(4)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 5, 5, 4)
    x[..., 1] = 0  # a channel that is zero everywhere (e.g. after a ReLU-like collapse)
    x.requires_grad_(True)
    grn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(grn.gamma.grad).all()


def test_cpu_row_blocks_stay_cache_sized_but_not_thin():
    from modules.common import _row_blocks
    # Stage C 1B at 1024² (2×24×24, MLP width 6144): 2 blocks of 576 pixels, not 7 thin ones
    assert _row_blocks(torch.empty(2, 24, 24, 1), 6144) == 2
    # Stage B's first level at 1024² (2×256×256, width 1280): 160 cache-sized blocks of ~819 pixels
    assert _row_blocks(torch.empty(2, 256, 256, 1), 1280) == 160
    assert _row_blocks(torch.empty(1, 4, 4, 1), 10**9) == 1
    # the demo Stage C in training (64×8×8, width 384): 2 blocks, so 32 whole samples each
    assert _row_blocks(torch.empty(64, 8, 8, 1), 384) == 2


def test_channel_mlp_in_blocks_of_whole_samples_equals_one_block(monkeypatch):
    """A batch of small maps runs as blocks of whole samples; GRN's statistics stay each sample's own."""
    from modules.common import ChannelMLP
    torch.manual_seed(0)
    mlp = ChannelMLP(8, 8, 0.0)
    for parameter in mlp.parameters():  # GRN's gamma and beta start at zero, which would hide its statistics
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(6, 3, 5, 8)
    monkeypatch.setattr(modules.common, "_row_blocks", lambda x, width: 1)
    whole = mlp(x)
    monkeypatch.setattr(modules.common, "_row_blocks", lambda x, width: 3)  # 2 samples per block
    torch.testing.assert_close(mlp(x), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mlp(x[2:3]), whole[2:3], rtol=1e-6, atol=1e-6)
