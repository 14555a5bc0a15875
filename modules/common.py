"""Blocks shared by Stage B and Stage C, and the U-Net body both stages are built from.

Every block of the body has the same call, `block(x, ctx)`: `ctx` is a `BlockContext` and each block reads the
field it needs. So the body runs as a plain loop, with no type dispatch that a wrapper (FSDP, activation
checkpointing) would break. Module names and nesting follow upstream exactly: released state dicts depend on them.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear without its own random fill: the models initialise every layer once (upstream's scheme)."""

    def reset_parameters(self):
        pass


class Conv2d(nn.Conv2d):
    """nn.Conv2d without its own random fill (see Linear)."""

    def reset_parameters(self):
        pass


class BlockContext(NamedTuple):
    """What the U-Net body hands every block."""
    r_embed: torch.Tensor  # B, c_r * (1 + len(t_conds)): noise level and t_conds, sinusoidal
    clip: torch.Tensor  # B, S, c_cond: conditioning tokens
    skip: Optional[torch.Tensor] = None  # B, C, H, W: the down path's output at this level (up path only)


def resize(x, size):
    """Bilinear resize with align_corners=True, as upstream resizes conditions, residuals and odd-sized maps."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B, C, H, W map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


_CACHE_BLOCK = 1 << 20  # elements of the widest activation per row block on CPU (4 MB in fp32)
# Pixels a block keeps at least: thinner blocks make the channel MLP's GEMMs too thin to run at speed (a Stage C
# ResBlock at 2×24×24 ran 10% (1B) and 13–19% (3.6B) faster than with ~144-pixel blocks; Stage B's maps unchanged).
_MIN_BLOCK_PIXELS = 512


def _row_blocks(x, width):
    """How many blocks of rows (dim 1) to run a B, H, W, · map in, so that a `width`-channel activation of a block
    stays in cache. On CPU a whole-map temporary costs a trip to memory and fresh pages, and this is most of a
    ResBlock's time outside its matmuls; accelerators prefer one large kernel."""
    if x.device.type != "cpu":
        return 1
    pixels = x.size(0) * x.size(1) * x.size(2)
    return max(1, min(x.size(1), math.ceil(pixels * width / _CACHE_BLOCK), pixels // _MIN_BLOCK_PIXELS))


class GlobalResponseNorm(nn.Module):
    """GRN of ConvNeXt V2 (Woo et al. 2023, eqs. 1-3) on B, H, W, C tensors."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def scale(self, blocks):
        """s with GRN(x) = x · s + beta (B, 1, 1, C), from x given as blocks of rows."""
        # the L2 norm over H, W as a sum of squares: torch.norm's strided reduction is ~10× slower on CPU. The clamp
        # only touches all-zero channels (where x, hence GRN's x-term, is 0 anyway): it keeps sqrt's gradient finite.
        gx = sum((h * h).sum(dim=(1, 2), keepdim=True) for h in blocks).clamp_min(1e-24).sqrt()
        return self.gamma * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + 1

    def forward(self, x):
        return torch.addcmul(self.beta, x, self.scale([x]))


class ChannelMLP(nn.Sequential):
    """Linear, GELU, GRN, Dropout, Linear over the channels of a B, H, W, C map (keys channelwise.{0,2,4}).

    Runs in blocks (see _row_blocks), each contiguous: a block across the batch would be a strided view, which a
    Linear runs as a batched matmul at about half the speed (Stage C 1B's 2×24² maps, 2 threads: 214–305 ms
    against 130–141 ms per fc1). With at most one block per sample, a block is whole samples (a training batch of
    small maps: one GEMM per block, not one per sample). Otherwise blocks are rows of one sample: a first pass
    makes the 4×-wide hidden blocks and GRN's statistics, a second normalises and projects them back."""

    def __init__(self, c_in, c, dropout):
        super().__init__(Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout),
                         Linear(c * 4, c))

    def forward(self, x):  # B, H, W, C, contiguous
        fc1, act, grn, drop, fc2 = self
        blocks = _row_blocks(x, fc1.out_features)
        if blocks == 1:
            return self._whole(x)
        if blocks <= x.size(0):  # blocks of whole samples: a slice of the batch is contiguous as well
            return torch.cat([self._whole(samples) for samples in x.tensor_split(blocks)])
        per_sample = math.ceil(blocks / x.size(0))
        out = []
        for sample in x.unbind(0):  # H, W, C
            hidden = [act(fc1(rows)) for rows in sample.chunk(per_sample, dim=0)]  # h, W, 4C
            scale = grn.scale([h.unsqueeze(0) for h in hidden])[0]  # 1, 1, 4C
            beta = grn.beta[0]
            out.append(torch.cat([fc2(drop(torch.addcmul(beta, h, scale))) for h in hidden], dim=0))
        return torch.stack(out)

    def _whole(self, x):  # GRN's statistics are per sample, so any whole samples run as one map
        fc1, act, grn, drop, fc2 = self
        h = act(fc1(x))
        return fc2(drop(torch.addcmul(grn.beta, h, grn.scale([h]))))


class ResBlock(nn.Module):
    """Depthwise conv + channel MLP with GRN (ConvNeXt V2). With c_skip > 0 (the first block of an up level) the
    MLP also reads the down path's output at that level, `ctx.skip`."""

    receives_control = True  # ControlNet residuals are added to the input of every ResBlock, in execution order

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = ChannelMLP(c + c_skip, c, dropout)
        self.c_skip = c_skip

    def forward(self, x, ctx=None):
        h = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)  # B, H, W, C
        if self.c_skip:
            h = torch.cat([h, ctx.skip.permute(0, 2, 3, 1)], dim=-1)  # B, H, W, C + c_skip
        return self.channelwise(h).permute(0, 3, 1, 2) + x


class FeedForwardBlock(nn.Module):
    """The ResBlock's channel MLP alone (level_config letter 'F')."""

    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = ChannelMLP(c, c, dropout)

    def forward(self, x, ctx=None):
        return self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


class Attention2D(nn.Module):
    """Multi-head attention from a feature map's pixels to `kv` tokens (and, with self_attn, to the pixels too).

    The weights live in `self.attn`, an nn.MultiheadAttention, for the released keys and LoRA's `.attn` filter;
    the computation goes through F.scaled_dot_product_attention with those weights read at call time, so a
    parametrization (LoRA) registered on them takes effect.
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x, kv, self_attn=False):
        B, C, H, W = x.shape
        q_in = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # B, HW, C
        if self_attn:
            kv = torch.cat([q_in, kv], dim=1)  # B, HW + S, C
        attn = self.attn
        w, b = attn.in_proj_weight, attn.in_proj_bias  # read once: a parametrization recomputes on every read
        q = F.linear(q_in, w[:C], b[:C])
        k, v = F.linear(kv, w[C:], b[C:]).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # B, nh, L, d
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        o = F.linear(o.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)  # B, HW, C
        return o.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # B, C, H, W


class AttnBlock(nn.Module):
    """Pre-norm attention to the conditioning tokens `ctx.clip`, mapped to the level's width."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), Linear(c_cond, c))

    def forward(self, x, ctx):
        kv = self.kv_mapper(ctx.clip)  # B, S, C
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


class TimestepBlock(nn.Module):
    """Modulates x by (1 + a) and shifts by b, with a, b summed over the noise level r and each of `conds`."""

    def __init__(self, c, c_timestep, conds=("sca",)):
        super().__init__()
        self.mapper = Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", Linear(c_timestep, c * 2))

    def forward(self, x, ctx):
        t = ctx.r_embed.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(t[0])
        for name, t_c in zip(self.conds, t[1:]):
            ab = ab + getattr(self, f"mapper_{name}")(t_c)
        a, b = ab[:, :, None, None].chunk(2, dim=1)  # B, C, 1, 1 each
        return torch.addcmul(b, x, 1 + a)


class CascadeUNet(nn.Module):
    """The U-Net body of Stage B and Stage C: embedding, levels of blocks (each level run 1 + len(repeat mappers)
    times, a 1×1 conv between passes), resamplers between levels, output head.

    A subclass registers its conditioning layers first (upstream's state-dict order), then calls `_build_body`,
    and defines `_resampler`. In forward it builds a BlockContext and runs `_down_encode` and `_up_decode`.
    """

    def __init__(self, c_r, t_conds, c_clip_seq):
        super().__init__()
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.c_clip_seq = c_clip_seq

    def _resampler(self, c_in, c_out, mode, level):
        """The layer that moves between level `level - 1` and `level` ('down') or back ('up')."""
        raise NotImplementedError

    def _build_body(self, c_in, c_out, patch_size, c_cond, c_hidden, nhead, blocks, block_repeat, level_config,
                    kernel_size, dropout, self_attn):
        n = len(c_hidden)
        dropout = dropout if isinstance(dropout, (list, tuple)) else [dropout] * n
        self_attn = self_attn if isinstance(self_attn, (list, tuple)) else [self_attn] * n
        block_repeat = block_repeat if block_repeat is not None else [[1] * n, [1] * n]

        def make(kind, i, c_skip=0):
            c = c_hidden[i]
            if kind == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropout[i])
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[i], self_attn=self_attn[i], dropout=dropout[i])
            if kind == "F":
                return FeedForwardBlock(c, dropout=dropout[i])
            if kind == "T":
                return TimestepBlock(c, self.c_r, conds=self.t_conds)
            raise ValueError(f"block type {kind!r} not supported (use C, A, F or T)")

        def repeat_mappers(i, repeats):
            return nn.ModuleList(Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(repeats - 1))

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            Conv2d(c_in * patch_size ** 2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = (nn.ModuleList() for _ in range(3))
        for i in range(n):
            self.down_downscalers.append(nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                self._resampler(c_hidden[i - 1], c_hidden[i], "down", i),
            ) if i > 0 else nn.Identity())
            self.down_blocks.append(nn.ModuleList(
                make(kind, i) for _ in range(blocks[0][i]) for kind in level_config[i]))
            self.down_repeat_mappers.append(repeat_mappers(i, block_repeat[0][i]))
        # up levels run deepest first; the first block of every level but the deepest also reads the skip
        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = (nn.ModuleList() for _ in range(3))
        for i in reversed(range(n)):
            self.up_upscalers.append(nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                self._resampler(c_hidden[i], c_hidden[i - 1], "up", i),
            ) if i > 0 else nn.Identity())
            self.up_blocks.append(nn.ModuleList(
                make(kind, i, c_skip=c_hidden[i] if i < n - 1 and j == k == 0 else 0)
                for j in range(blocks[1][::-1][i]) for k, kind in enumerate(level_config[i])))
            self.up_repeat_mappers.append(repeat_mappers(i, block_repeat[1][::-1][i]))
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            Conv2d(c_hidden[0], c_out * patch_size ** 2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )

    @torch.no_grad()
    def _init_weights(self, blocks, cond_layers):
        """Upstream's init: xavier everywhere, small normal conditioning maps, near-zero input and zero output
        convs, MLP outputs scaled down with depth, timestep modulation starting at zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # incl. the attention's out_proj
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for layer in cond_layers:
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.zeros_(self.clf[1].weight)
        for block in (b for level in [*self.down_blocks, *self.up_blocks] for b in level):
            if isinstance(block, (ResBlock, FeedForwardBlock)):
                block.channelwise[-1].weight.mul_(math.sqrt(1 / sum(blocks[0])))
            elif isinstance(block, TimestepBlock):
                for layer in block.children():
                    nn.init.zeros_(layer.weight)

    def gen_r_embedding(self, r, max_positions=10000):
        """Sinusoidal embedding (sin then cos) of r · max_positions, in fp32 whatever r's dtype: B -> B, c_r."""
        r = r.float() * max_positions
        half_dim = self.c_r // 2
        freqs = torch.arange(half_dim, device=r.device, dtype=torch.float32)
        freqs = freqs.mul(-math.log(max_positions) / (half_dim - 1)).exp()
        emb = r[:, None] * freqs[None, :]
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)
        return F.pad(emb, (0, 1)) if self.c_r % 2 else emb

    def _context(self, r, conds, clip, dtype):
        """BlockContext for r and each of t_conds taken from `conds` (zeros where absent), in the weights' dtype."""
        embs = [self.gen_r_embedding(r)]
        embs += [self.gen_r_embedding(conds.get(name, torch.zeros_like(r))) for name in self.t_conds]
        return BlockContext(torch.cat(embs, dim=1).to(dtype), clip)

    def _pooled_tokens(self, mapper, emb):
        """A pooled embedding (B, c or B, S, c) mapped to c_clip_seq tokens per entry: B, S * c_clip_seq, c_cond."""
        if emb.dim() == 2:
            emb = emb.unsqueeze(1)
        return mapper(emb).view(emb.size(0), emb.size(1) * self.c_clip_seq, -1)

    def _run_level(self, x, blocks, repeat_mappers, ctx, controls):
        for mapper in [*repeat_mappers, None]:
            for block in blocks:
                if controls is not None and getattr(block, "receives_control", False):
                    control = next(controls, None)
                    if control is not None:
                        x = x + resize(control, x.shape[-2:]).to(x.dtype)
                x = block(x, ctx)
            if mapper is not None:
                x = mapper(x)
        return x

    def _down_encode(self, x, ctx, controls=None):
        """Returns each level's output, deepest first."""
        level_outputs = []
        levels = zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers)
        for blocks, downscaler, repeat_mappers in levels:
            x = self._run_level(downscaler(x), blocks, repeat_mappers, ctx, controls)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs, ctx, controls=None):
        x = level_outputs[0]
        levels = zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        for i, (blocks, upscaler, repeat_mappers) in enumerate(levels):
            if i > 0:  # odd sizes: the upscaled map can miss the skip's size by a pixel
                x = resize(x, level_outputs[i].shape[-2:])
                ctx = ctx._replace(skip=level_outputs[i])
            x = upscaler(self._run_level(x, blocks, repeat_mappers, ctx, controls))
        return x
