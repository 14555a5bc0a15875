"""Stage A: the f4 VQGAN between images in [0, 1] (3×H×W) and Stage B's 4×H/4×W/4 latents."""
import torch
from torch import nn


class VectorQuantize(nn.Module):
    """Nearest-codebook-row quantizer with a straight-through gradient (VQ-VAE, arXiv:1711.00937).

    Stands in for upstream's `torchtools.nn.VectorQuantize` (not installable): same codebook key
    (`codebook.weight`), init, call (`forward(x, dim=1)`) and return value, so released weights and callers fit.
    """

    def __init__(self, embedding_size, k):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)
        nn.init.uniform_(self.codebook.weight, -1.0 / k, 1.0 / k)

    def forward(self, x, dim=-1):
        """Returns (quantized, (codebook_loss, commitment_loss), indices); indices have x's shape without `dim`."""
        x = x.movedim(dim, -1)  # ..., C
        flat = x.reshape(-1, x.size(-1))  # N, C
        # distances in fp32 so bf16 activations still pick the true nearest row
        indices = torch.cdist(flat.float(), self.codebook.weight.float()).argmin(dim=1)  # N
        rows = self.codebook(indices)  # N, C; carries the codebook's gradient
        codebook_loss = (rows - flat.detach()).pow(2).mean()
        commitment_loss = (flat - rows.detach()).pow(2).mean()
        # forward: the codebook rows exactly (adding an exact zero); backward: identity to the encoder
        quantized = rows.detach().to(flat.dtype) + (flat - flat.detach())
        quantized = quantized.view(x.shape).movedim(-1, dim)
        return quantized, (codebook_loss, commitment_loss), indices.view(x.shape[:-1])


class ResBlock(nn.Module):
    """Stage A's residual block: a depthwise 3×3 conv, then a channel MLP, each after a non-affine LayerNorm.

    Six scalars (`gammas`) give each half's norm scale/shift and residual gain; they start at zero, so a fresh
    block is the identity. Differs from the Stage B/C ResBlock (replication padding, no conditioning).
    """

    def __init__(self, c, c_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _norm(x, norm):
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels of B, C, H, W

    def forward(self, x):  # B, C, H, W
        g = self.gammas
        x = x + self.depthwise(self._norm(x, self.norm1) * (1 + g[0]) + g[1]) * g[2]
        h = self._norm(x, self.norm2) * (1 + g[3]) + g[4]
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class StageA(nn.Module):
    """VQGAN with a 2× pixel-unshuffle stem and `levels - 1` stride-2 convs (f4 at the default 2 levels).

    Latents are divided by `scale_factor` on the way out and multiplied back on the way in, so Stage B
    sees roughly unit-variance latents.
    """

    def __init__(self, levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192,
                 scale_factor=0.43):
        super().__init__()
        self.c_latent = c_latent
        self.codebook_size = codebook_size
        self.scale_factor = scale_factor
        c_levels = [c_hidden // 2 ** i for i in reversed(range(levels))]  # e.g. [192, 384]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down_blocks = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down_blocks.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down_blocks.append(ResBlock(c, c * 4))
        down_blocks.append(nn.Sequential(
            nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent),  # standardises the latents before quantization
        ))
        self.down_blocks = nn.Sequential(*down_blocks)

        self.vquantizer = VectorQuantize(c_latent, k=codebook_size)

        up_blocks = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        c_up = c_levels[::-1]  # deepest first
        for i, c in enumerate(c_up):
            up_blocks.extend(ResBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up_blocks.append(nn.ConvTranspose2d(c, c_up[i + 1], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up_blocks)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def encode(self, x, quantize=False):
        """x: B, 3, H, W in [0, 1] → latent B, c_latent, H/4, W/4 (scaled); quantized form and VQ loss on request.

        Returns (latent, None, None, None), or with quantize (quantized, unquantized, indices B×h×w,
        codebook loss + 0.25 · commitment loss).
        """
        x = self.down_blocks(self.in_block(x))  # B, c_latent, h, w
        if not quantize:
            return x / self.scale_factor, None, None, None
        quantized, (codebook_loss, commitment_loss), indices = self.vquantizer(x, dim=1)
        return quantized / self.scale_factor, x / self.scale_factor, indices, codebook_loss + 0.25 * commitment_loss

    def decode(self, x):
        """Scaled latent B, c_latent, h, w → image B, 3, 4h, 4w; not clamped (callers clamp to [0, 1])."""
        return self.out_block(self.up_blocks(x * self.scale_factor))

    def forward(self, x, quantize=False):
        """Reconstruction and VQ loss (None without quantize), as upstream's Stage A trainer expects."""
        latent, _, _, vq_loss = self.encode(x, quantize)
        return self.decode(latent), vq_loss
