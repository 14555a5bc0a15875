"""Upstream's notebook helpers, without network or IPython requirements."""
from math import ceil

import torch
import torch.nn.functional as F


def calculate_latent_sizes(height=1024, width=1024, batch_size=4, compression_factor_b=42.67,
                           compression_factor_a=4.0):
    """Latent shapes for an output of `height`×`width`: Stage C (16 ch, ~42.67×) and Stage B (4 ch, 4×)."""
    stage_c = (batch_size, 16, ceil(height / compression_factor_b), ceil(width / compression_factor_b))
    stage_b = (batch_size, 4, ceil(height / compression_factor_a), ceil(width / compression_factor_a))
    return stage_c, stage_b


def pil_to_tensor(image):
    """PIL image → 3×H×W float in [0,1]; RGBA is composited on white, grayscale and 16-bit are converted."""
    import numpy as np
    from PIL import Image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        array = array / (65535.0 if array.max() > 255 else 255.0)
        return torch.from_numpy(np.ascontiguousarray(array)).clamp(0, 1)[None].repeat(3, 1, 1)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def resize_image(image, size=768):
    """Resize so the shorter side is `size` (antialiased); accepts a PIL image or a C×H×W / B×C×H×W tensor."""
    tensor = pil_to_tensor(image) if not torch.is_tensor(image) else image
    batched = tensor.dim() == 4
    x = tensor if batched else tensor[None]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False,
                      antialias=True)
    return x if batched else x[0]


def downscale_images(images, factor=3 / 4):
    """Nearest-neighbour downscale by `factor` to a multiple of 32 (the EfficientNet input for Stage B)."""
    h = int(((images.size(-2) * factor) // 32) * 32)
    w = int(((images.size(-1) * factor) // 32) * 32)
    if h < 32 or w < 32:
        raise ValueError(f"images of {images.size(-2)}×{images.size(-1)} are too small to downscale by {factor} "
                         "to at least 32×32")
    return F.interpolate(images, size=(h, w), mode="nearest")


def to_pil(images):
    """B×C×H×W in [0,1] → list of PIL RGB images (1-channel repeated, extra channels dropped)."""
    from PIL import Image
    if images.size(1) == 1:
        images = images.repeat(1, 3, 1, 1)
    elif images.size(1) > 3:
        images = images[:, :3]
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def show_images(images, rows=None, cols=None, return_images=True):
    """Paste a batch into one grid image and return it (display it with your notebook's own tools)."""
    from PIL import Image
    tiles = to_pil(images)
    rows = rows or 1
    cols = cols or ceil(len(tiles) / rows)
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, (i % cols * w, i // cols * h))
    return grid if return_images else None


def load_image(path):
    """Reads an image file into 3×H×W float in [0,1] (RGBA, grayscale and 16-bit handled); a clear error otherwise."""
    import os
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Pass a PNG/JPEG/WebP file.") from None
