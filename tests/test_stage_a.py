"""Stage A: released layout, parity with diffusers' PaellaVQModel (an independent port of the same VQGAN), VQ maths."""
import json
import os

import pytest
import torch
from conftest import REFERENCE

from modules.stage_a import StageA, VectorQuantize


def _layout(name):
    with open(os.path.join(REFERENCE, "checkpoint-layouts", f"{name}.json")) as f:
        return json.load(f)


def _randomise(model):
    """Every parameter and buffer random (not the init), at scales that keep activations O(1)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.dim() >= 2:
                t.normal_(0, t[0].numel() ** -0.5)  # 1/sqrt(fan_in)
            else:
                t.normal_(0, 0.3)
    return model.eval()


def _to_diffusers(state_dict):
    """Our key names → PaellaVQModel's: only the codebook differs (`codebook` vs `embedding`)."""
    return {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in state_dict.items()}


def test_layout_matches_released_file():
    ref = _layout("stage_a")
    with torch.device("meta"):
        model = StageA(**ref["kwargs"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(ref["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]


def test_meta_shapes_1024():
    with torch.device("meta"):
        model = StageA()
        x = torch.empty(1, 3, 1024, 1024)
        latent, none1, none2, none3 = model.encode(x)
        q, u, idx, loss = model.encode(x, quantize=True)
        image = model.decode(torch.empty(1, 4, 256, 256))
    assert latent.shape == q.shape == u.shape == (1, 4, 256, 256)
    assert none1 is none2 is none3 is None
    assert idx.shape == (1, 256, 256) and loss.shape == ()
    assert image.shape == (1, 3, 1024, 1024)


@pytest.mark.parametrize("levels,bottleneck_blocks,c_hidden,codebook_size,size", [
    (2, 2, 32, 64, 32),
    (3, 1, 64, 256, 32),
    (2, 12, 32, 8192, 32),  # the released depth at narrow width
])
def test_parity_with_diffusers(levels, bottleneck_blocks, c_hidden, codebook_size, size):
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    sf = 0.43
    ours = _randomise(StageA(levels=levels, bottleneck_blocks=bottleneck_blocks, c_hidden=c_hidden,
                             codebook_size=codebook_size, scale_factor=sf))
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():  # codebook rows near actual latents, so the comparison exercises many of them
        latents = (ours.encode(x)[0] * sf).permute(0, 2, 3, 1).reshape(-1, 4)
        codebook = ours.vquantizer.codebook.weight
        picked = latents[torch.randint(len(latents), (codebook_size,))]
        codebook.copy_(picked + 0.1 * latents.std(0) * torch.randn_like(codebook))
    theirs = PaellaVQModel(levels=levels, bottleneck_blocks=bottleneck_blocks, embed_dim=c_hidden, latent_channels=4,
                           num_vq_embeddings=codebook_size, scale_factor=sf).eval()
    theirs.load_state_dict(_to_diffusers(ours.state_dict()), strict=True)

    def close(a, b):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()

    z = torch.randn(2, 4, size // 4, size // 4)
    with torch.no_grad():
        latent = ours.encode(x)[0]
        q, u, idx, loss = ours.encode(x, quantize=True)
        h = theirs.encode(x).latents
        zq, loss_ref, (_, _, idx_ref) = theirs.vquantizer(h)
        close(latent * sf, h)
        close(u * sf, h)
        assert torch.equal(idx.flatten(), idx_ref)
        assert idx.unique().numel() > 8
        close(q * sf, zq)
        close(loss, loss_ref)
        close(ours.decode(z), theirs.decode(z * sf).sample)
        close(ours.decode(q), theirs.decode(zq).sample)


def test_vq_returns_nearest_codebook_rows():
    vq = VectorQuantize(4, k=32)
    with torch.no_grad():
        vq.codebook.weight.normal_()
    x = torch.randn(2, 4, 5, 6)  # B, C, H, W
    q, _, idx = vq(x, dim=1)
    assert idx.shape == (2, 5, 6) and idx.dtype == torch.long
    rows = x.permute(0, 2, 3, 1).unsqueeze(-2)  # B, H, W, 1, C
    brute = (rows - vq.codebook.weight).pow(2).sum(-1).argmin(-1)  # B, H, W
    assert torch.equal(idx, brute)
    assert torch.equal(q, vq.codebook.weight[idx].permute(0, 3, 1, 2))


def test_vq_gradients_straight_through_and_losses():
    vq = VectorQuantize(4, k=16)
    with torch.no_grad():
        vq.codebook.weight.normal_()
    x = torch.randn(3, 4, 7, requires_grad=True)  # quantize along dim 1
    q, (codebook_loss, commitment_loss), idx = vq(x, dim=1)
    rows = vq.codebook.weight[idx].transpose(1, 2)  # 3, 4, 7
    expected = (rows - x).pow(2).mean()
    torch.testing.assert_close(codebook_loss, expected)
    torch.testing.assert_close(commitment_loss, expected)

    g = torch.randn_like(q)
    (q * g).sum().backward()
    assert torch.equal(x.grad, g)  # identity gradient through the quantizer
    assert vq.codebook.weight.grad is None  # the quantized output itself does not train the codebook

    codebook_loss.backward()
    residual = (rows - x).detach().transpose(1, 2).reshape(-1, 4)  # N, C
    expected_grad = torch.zeros_like(vq.codebook.weight).index_add(0, idx.flatten(), 2 * residual / x.numel())
    torch.testing.assert_close(vq.codebook.weight.grad, expected_grad)


def test_encoder_trains_through_quantizer():
    model = _randomise(StageA(levels=2, bottleneck_blocks=1, c_hidden=32, codebook_size=64))
    encoder = [p for n, p in model.named_parameters() if n.startswith(("in_block", "down_blocks"))]
    x = torch.rand(2, 3, 16, 16)
    q, u, _, vq_loss = model.encode(x, quantize=True)
    w = torch.randn(2, 3, 16, 16)
    grads = torch.autograd.grad((model.decode(q) * w).sum(), encoder, retain_graph=True)

    # oracle: the decoder's gradient at the quantized latent, sent unchanged into the unquantized one
    q_leaf = q.detach().requires_grad_()
    (g_q,) = torch.autograd.grad((model.decode(q_leaf) * w).sum(), q_leaf)
    expected = torch.autograd.grad(u, encoder, grad_outputs=g_q)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert all(g.abs().sum() > 0 for g in grads)

    # codebook loss + 0.25 · commitment loss, both equal to the mean squared quantization error in value
    sf = model.scale_factor
    torch.testing.assert_close(vq_loss, 1.25 * ((q - u) * sf).pow(2).mean())


def test_forward_is_encode_then_decode_without_clamp():
    model = _randomise(StageA(levels=2, bottleneck_blocks=1, c_hidden=32, codebook_size=64))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out, loss = model(x)
        assert loss is None
        torch.testing.assert_close(out, model.decode(model.encode(x)[0]))
        out_q, loss_q = model(x, quantize=True)
        q, _, _, expected_loss = model.encode(x, quantize=True)
        torch.testing.assert_close(out_q, model.decode(q))
        torch.testing.assert_close(loss_q, expected_loss)
    assert out.min() < 0 or out.max() > 1  # random weights leave [0, 1]: decode must not clamp


@pytest.mark.parametrize("weights_dtype,autocast", [(torch.bfloat16, False), (torch.bfloat16, True),
                                                    (torch.float32, True)])
def test_bf16(weights_dtype, autocast):
    model = _randomise(StageA(levels=2, bottleneck_blocks=2, c_hidden=32, codebook_size=64))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref_latent = model.encode(x)[0]
        ref_image = model.decode(ref_latent)
        model.to(weights_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            latent = model.encode(x.to(weights_dtype))[0]
            q, _, idx, loss = model.encode(x.to(weights_dtype), quantize=True)
            image = model.decode(ref_latent.to(weights_dtype))
    for got, ref in [(latent, ref_latent), (image, ref_image)]:
        assert got.dtype == torch.bfloat16 or autocast
        assert (got.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    rows = model.vquantizer.codebook.weight[idx].permute(0, 3, 1, 2).float()
    assert (q.float() * model.scale_factor - rows).abs().max() <= 0.02 * rows.abs().max()
    assert torch.isfinite(loss)
