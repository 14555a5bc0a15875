"""Stage B: the diffusion decoder from EfficientNet latents (and pooled text) to Stage A latents, 4×H/4×W/4."""
from torch import nn

from .common import CascadeUNet, Conv2d, LayerNorm2d, resize


def _condition_mapper(c_in, c):
    """Per-pixel MLP that maps a spatial condition (EfficientNet latents, pixels) to the first level's width."""
    return nn.Sequential(
        Conv2d(c_in, c * 4, kernel_size=1),
        nn.GELU(),
        Conv2d(c * 4, c, kernel_size=1),
        LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
    )


class StageB(CascadeUNet):
    """The EfficientNet latents (and optional low-res pixels) are mapped per pixel, resized to the first level and
    added to the embedded input; the pooled text embedding becomes c_clip_seq tokens for the attention blocks."""

    def __init__(self, c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 640, 1280, 1280],
                 nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
                 block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]], level_config=['CT', 'CT', 'CTA', 'CTA'], c_clip=1280,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True,
                 t_conds=['sca']):
        super().__init__(c_r, t_conds, c_clip_seq)
        self.c_pixels = c_pixels
        self.effnet_mapper = _condition_mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _condition_mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self._build_body(c_in, c_out, patch_size, c_cond, c_hidden, nhead, blocks, block_repeat, level_config,
                         kernel_size, dropout, self_attn)
        self._init_weights(blocks, [self.clip_mapper, self.effnet_mapper[0], self.effnet_mapper[2],
                                    self.pixels_mapper[0], self.pixels_mapper[2]])

    def _resampler(self, c_in, c_out, mode, level):
        if mode == "down":
            return Conv2d(c_in, c_out, kernel_size=2, stride=2)
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)

    def gen_c_embeddings(self, clip):
        """Pooled text, B, c_clip or B, S, c_clip -> B, S · c_clip_seq, c_cond."""
        return self.clip_norm(self._pooled_tokens(self.clip_mapper, clip))

    def forward(self, x, r, effnet, clip, pixels=None, **kwargs):
        """x: B, c_in, H, W latents; r: B noise levels; effnet: B, c_effnet, h, w (any h, w); clip: pooled text;
        pixels: B, c_pixels, h', w' (zeros 8×8 when None); kwargs: t_conds (sca) as B tensors."""
        dtype = self.embedding[1].weight.dtype
        if pixels is None:
            pixels = x.new_zeros(x.size(0), self.c_pixels, 8, 8, dtype=dtype)
        ctx = self._context(r, kwargs, self.gen_c_embeddings(clip.to(dtype)), dtype)
        x = self.embedding(x.to(dtype))  # B, c_hidden[0], H / patch, W / patch
        x = x + self.effnet_mapper(resize(effnet.to(dtype), x.shape[-2:]))
        x = x + resize(self.pixels_mapper(pixels.to(dtype)), x.shape[-2:])
        return self.clf(self._up_decode(self._down_encode(x, ctx), ctx))
