"""Stage C: the text-conditional prior that denoises 16×24×24 EfficientNet latents (for a 1024² image)."""
import torch
from torch import nn

from .common import Attention2D, CascadeUNet, Conv2d


class UpDownBlock2d(nn.Module):
    """1×1 conv between levels, with a ×2 (up) or ×½ (down) bilinear resize when its switch_level is on."""

    def __init__(self, c_in, c_out, mode, enabled=True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', not {mode!r}")
        resample = nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear",
                               align_corners=True) if enabled else nn.Identity()
        mapping = Conv2d(c_in, c_out, kernel_size=1)
        # upsample before the conv, downsample after it: the conv always runs on the smaller map
        self.blocks = nn.Sequential(*([resample, mapping] if mode == "up" else [mapping, resample]))

    def forward(self, x):
        return self.blocks(x)


def coordinate_grid(x):
    """1, 2, H, W: each position's row and column of x's grid, from -1 (top, left) to 1 (bottom, right)."""
    h, w = x.shape[-2:]
    rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    columns = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    return torch.stack(torch.meshgrid(rows, columns, indexing="ij"))[None]


class LayoutAttention(nn.Module):
    """Cross-attention from queries that depend on the place alone (a small MLP of `coordinate_grid`) to the
    conditioning tokens: a map of what the prompt puts where, added to the input embedding. Not in the released
    models. The demo's Stage C learned the prompt's colour but not its position through the attention blocks,
    whose queries come from features that are mostly noise early in sampling (issue #9, demo/README.md)."""

    def __init__(self, c, c_cond, nhead):
        super().__init__()
        self.query = nn.Sequential(Conv2d(2, c, kernel_size=1), nn.GELU(), Conv2d(c, c, kernel_size=1))
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))
        self.attention = Attention2D(c, nhead)

    def forward(self, h, clip):
        """h: B, C, H, W (only its size, dtype and device are used); clip: B, S, c_cond -> B, C, H, W."""
        queries = self.query(coordinate_grid(h)).expand(h.shape[0], -1, -1, -1)
        return self.attention(queries, self.kv_mapper(clip))


class StageC(CascadeUNet):
    """Text tokens, pooled text and image embeddings become c_cond tokens for the attention blocks; the noise
    level r and t_conds (sca, crp) drive the timestep blocks; optional ControlNet residuals are added before
    every ResBlock, in execution order."""

    def __init__(self, c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=[2048, 2048], nhead=[32, 32],
                 blocks=[[8, 24], [24, 8]], block_repeat=[[1, 1], [1, 1]], level_config=['CTA', 'CTA'],
                 c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
                 dropout=[0.1, 0.1], self_attn=True, t_conds=['sca', 'crp'], switch_level=[False],
                 layout_attention=0):
        super().__init__(c_r, t_conds, c_clip_seq)
        self.switch_level = switch_level
        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self._build_body(c_in, c_out, patch_size, c_cond, c_hidden, nhead, blocks, block_repeat, level_config,
                         kernel_size, dropout, self_attn)
        # layout_attention: its number of heads (0: none, as in the released models); it starts as a no-op
        self.layout_attention = LayoutAttention(c_hidden[0], c_cond, layout_attention) if layout_attention else None
        self._init_weights(blocks, [self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper])
        if self.layout_attention is not None:
            nn.init.zeros_(self.layout_attention.attention.attn.out_proj.weight)

    def _resampler(self, c_in, c_out, mode, level):
        return UpDownBlock2d(c_in, c_out, mode, enabled=self.switch_level[level - 1])

    def gen_c_embeddings(self, clip_txt, clip_txt_pooled, clip_img):
        """B, 77, c_clip_text + pooled (B, c or B, 1, c) + image (same) -> B, 77 + 2 · c_clip_seq, c_cond."""
        clip = torch.cat([
            self.clip_txt_mapper(clip_txt),
            self._pooled_tokens(self.clip_txt_pooled_mapper, clip_txt_pooled),
            self._pooled_tokens(self.clip_img_mapper, clip_img),
        ], dim=1)
        return self.clip_norm(clip)

    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **kwargs):
        """x: B, c_in, H, W latents; r: B noise levels; kwargs: t_conds (sca, crp) as B tensors; cnet: a list of
        per-ResBlock residuals (B, C, h, w, any h, w; None to skip a block), e.g. ControlNet's output."""
        dtype = self.embedding[1].weight.dtype
        clip = self.gen_c_embeddings(clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype))
        ctx = self._context(r, kwargs, clip, dtype)
        controls = iter(cnet) if cnet is not None else None
        h = self.embedding(x.to(dtype))
        if self.layout_attention is not None:
            h = h + self.layout_attention(h, clip)
        level_outputs = self._down_encode(h, ctx, controls)
        return self.clf(self._up_decode(level_outputs, ctx, controls))
