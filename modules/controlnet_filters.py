"""ControlNet filters: they turn a batch of [0,1] RGB images (B×3×H×W) into what a ControlNet reads (SPEC §6).

Each filter has upstream's constructor, `Filter(device, **controlnet_filter_params)`, so upstream's configs
build it by name; `num_channels()` is the ControlNet's c_in; calling it returns the control tensor on the
filter's device; `preview(images, control)` is a B×3×H×W picture of the control for people to look at (the
edges, the masked image, the low-resolution input, the face boxes). OpenCV and insightface are imported only
by the filters that use them, so importing this module (or Stage C) pulls in neither.
"""
import os
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from core.conditioning import effnet_preprocess


def _rand(generator, *shape):
    """Uniform [0, 1) numbers on the CPU (where a seeded generator lives), a scalar without a shape."""
    return torch.rand(shape, generator=generator)


class BaseFilter:
    """The identity: a 3-channel ControlNet reads the image itself."""
    output_scale = 1  # output size / control image size at inference (super resolution: 2)

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def num_channels(self):
        return 3

    def __call__(self, x):
        return x.to(self.device)

    def preview(self, images, control):
        return images.clamp(0, 1)


class CannyFilter(BaseFilter):
    """Canny edges (1 channel, 0 or 1 at `resize`², bilinear in between): upstream's recipe exactly — bilinear
    resize to resize×resize, truncation to uint8, `cv2.Canny(rgb, 100, 200)` on all three channels (OpenCV keeps
    the strongest channel's gradient), /255, bilinear back to the input size."""

    def __init__(self, device="cpu", resize=224):
        super().__init__(device)
        self.resize = resize

    def num_channels(self):
        return 1

    def __call__(self, x):
        try:
            import cv2
        except ImportError:
            raise ImportError("CannyFilter needs OpenCV: pip install opencv-python-headless") from None
        size = x.shape[-2:]
        x = x.detach().float().cpu().clamp(0, 1)  # clamped: a value above 1 would wrap around in uint8
        if self.resize is not None:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear")
        pixels = x.mul(255).permute(0, 2, 3, 1).numpy().astype("uint8")  # B, h, w, 3, truncated like upstream
        edges = torch.stack([torch.from_numpy(cv2.Canny(p, 100, 200)) for p in pixels])[:, None].float() / 255
        if self.resize is not None:
            edges = F.interpolate(edges, size=size, mode="bilinear")
        return edges.to(self.device)  # B, 1, H, W

    def preview(self, images, control):
        return control.float().clamp(0, 1).expand(-1, 3, -1, -1).to(images.device)


class InpaintFilter(BaseFilter):
    """The image with the region to fill set to 1 (white), plus that region as a fourth channel.

    The region is the user's `mask` (True or > 0.5 = fill; `outpaint` inverts it), honoured pixel for pixel.
    Without one (training), it is the saliency network's map of the image resized to 240 px, thresholded at
    t ~ U(threshold), inverted with probability `p_outpaint` (outpainting), smoothed with a Gaussian (upstream's
    141 px kernel at its 768 px training size, scaled with the image) and cut at 0.5. Without the saliency
    weights, random brush strokes and boxes take the map's place, so training still runs; `mask_source` says
    which of the two is in use. (Upstream's configs spell the range `thresold`;
    the trainer's config reads that as `threshold`.)
    """

    def __init__(self, device="cpu", threshold=(0.04, 0.4), p_outpaint=0.4, saliency_path=None):
        super().__init__(device)
        from modules.saliency import SALIENCY_PATH
        self.threshold = tuple(threshold)
        self.p_outpaint = p_outpaint
        self.saliency_path = saliency_path or SALIENCY_PATH
        self._saliency, self._warned = None, False
        self.mask_source = "saliency" if os.path.isfile(self.saliency_path) else "random"

    def num_channels(self):
        return 4

    def __call__(self, x, mask=None, threshold=None, outpaint=None, generator=None):
        x = x.to(self.device)
        if mask is not None:
            mask = self._user_mask(mask, x)
            if outpaint:
                mask = ~mask
        else:
            mask = self._auto_mask(x, threshold, outpaint, generator)
        return torch.cat([torch.where(mask, torch.ones_like(x), x), mask.to(x.dtype)], dim=1)  # B, 4, H, W

    def preview(self, images, control):
        return control[:, :3].float().clamp(0, 1).to(images.device)

    @staticmethod
    def _user_mask(mask, x):
        mask = mask.to(x.device)
        while mask.dim() < 4:
            mask = mask[None]
        if mask.shape[1] != 1 or mask.shape[-2:] != x.shape[-2:] or mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mask must be B×1×H×W (or H×W) at the image's size {tuple(x.shape[-2:])} for "
                             f"{x.shape[0]} image(s), got {tuple(mask.shape)}")
        mask = mask if mask.dtype == torch.bool else mask > 0.5
        return mask.expand(x.shape[0], -1, -1, -1)

    def _auto_mask(self, x, threshold, outpaint, generator):
        """B×1×H×W bool: the saliency map (or random shapes) thresholded, maybe inverted, smoothed at full size."""
        B, _, H, W = x.shape
        if self.mask_source == "saliency":
            if self._saliency is None:
                from modules.saliency import load_saliency_net
                self._saliency = load_saliency_net(self.saliency_path, self.device)
            saliency = self._saliency(TF.resize(x.float(), 240, antialias=True))  # B, 1, h, w
            lo, hi = self.threshold
            t = lo + (hi - lo) * _rand(generator, B) if threshold is None else torch.full((B,), float(threshold))
            region = saliency > t.to(x.device).view(B, 1, 1, 1)
        else:
            if not self._warned:
                warnings.warn(f"InpaintFilter: no saliency weights at {self.saliency_path}, using random brush and "
                              "box masks (`bash models/download_models.sh controlnet saliency` gets the weights)",
                              stacklevel=3)
                self._warned = True
            region = random_masks(B, H, W, generator).to(x.device)
        if outpaint is None:
            flip = (_rand(generator, B) < self.p_outpaint).to(x.device).view(B, 1, 1, 1)
        else:
            flip = torch.full((B, 1, 1, 1), bool(outpaint), device=x.device)
        region = region ^ flip
        region = F.interpolate(region.float(), size=(H, W), mode="nearest")
        kernel = max(3, int(141 * min(H, W) / 768) // 2 * 2 + 1)
        return gaussian_blur(region, kernel) > 0.5


def gaussian_blur(x, kernel_size):
    """torchvision's gaussian_blur (same sigma for a kernel size, reflect padding) as two 1-D passes: the 2-D
    kernel it convolves with costs kernel_size² per pixel, seconds for upstream's 141 px kernel on the CPU."""
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    t = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - (kernel_size - 1) / 2
    weights = torch.exp(-0.5 * (t / sigma) ** 2)
    weights = weights / weights.sum()
    B, C, H, W = x.shape
    pad = kernel_size // 2
    x = F.pad(x.reshape(B * C, 1, H, W), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, weights.view(1, 1, 1, -1))
    x = F.conv2d(x, weights.view(1, 1, -1, 1))
    return x.view(B, C, H, W)


def random_masks(batch, height, width, generator=None, grid=32):
    """B×1×h×w bool masks of brush strokes and boxes, on a grid whose shorter side has `grid` cells (smoothed and
    upsampled by the caller like the saliency map): the fallback when the saliency weights are absent."""
    scale = grid / min(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = torch.zeros(batch, 1, h, w, dtype=torch.bool)
    side = min(h, w)
    for b in range(batch):
        kind = _rand(generator)
        if kind < 0.7:  # boxes, alone or with strokes
            for _ in range(1 + int(_rand(generator) * 3)):
                bh, bw = ((0.2 + 0.4 * _rand(generator, 2)) * torch.tensor([h, w])).tolist()
                y0, x0 = (_rand(generator) * (h - bh)).item(), (_rand(generator) * (w - bw)).item()
                masks[b, 0] |= (ys >= y0) & (ys < y0 + bh) & (xs >= x0) & (xs < x0 + bw)
        if kind > 0.3:  # strokes: a random walk of thick line segments
            for _ in range(1 + int(_rand(generator) * 4)):
                radius = side * (0.04 + 0.08 * _rand(generator).item())
                point = _rand(generator, 2) * torch.tensor([h, w])
                for _ in range(4 + int(_rand(generator) * 6)):
                    angle = _rand(generator) * 2 * torch.pi
                    step = side * (0.1 + 0.25 * _rand(generator))
                    end = point + step * torch.stack([angle.sin(), angle.cos()])
                    for f in torch.linspace(0, 1, int(step.item() * 2) + 2):
                        c = point + f * (end - point)
                        masks[b, 0] |= (ys - c[0]) ** 2 + (xs - c[1]) ** 2 <= radius ** 2
                    point = end
    return masks


class SREffnetFilter(BaseFilter):
    """Super resolution: EfficientNet latents (16 channels) of the image at `scale_factor` (nearest), upsampled
    back by 1/scale_factor (nearest), so a ControlNet sees a coarse latent at the target latent size.

    At inference the control image is the low-resolution input: the pipeline makes an output 1/scale_factor
    times its size (`output_scale`) and hands the filter the image at that size (nearest), which the filter's
    own nearest downscale returns exactly. The EfficientNet is the pipeline's or trainer's (`effnet=`), or
    loaded from `effnet_checkpoint_path`.
    """

    def __init__(self, device="cpu", scale_factor=0.5, effnet=None,
                 effnet_checkpoint_path="models/effnet_encoder.safetensors"):
        super().__init__(device)
        self.scale_factor = scale_factor
        self.output_scale = round(1 / scale_factor)
        if effnet is None:
            from core.weights import load_model
            effnet = load_model(effnet_checkpoint_path, kind="effnet", device=self.device)
        self.effnet = effnet.eval().requires_grad_(False)

    def num_channels(self):
        return 16

    @torch.no_grad()
    def __call__(self, x):
        small = F.interpolate(x.to(self.device).float(), scale_factor=self.scale_factor, mode="nearest")
        weight = next(self.effnet.parameters())
        latents = self.effnet(effnet_preprocess(small).to(weight.device, weight.dtype)).float()
        return F.interpolate(latents, scale_factor=1 / self.scale_factor, mode="nearest").to(self.device)

    def preview(self, images, control):
        small = F.interpolate(images.float(), scale_factor=self.scale_factor, mode="nearest")
        return F.interpolate(small, size=images.shape[-2:], mode="nearest").clamp(0, 1)


_ID_COLORS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0],
                           [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, 0, .5], [0, .5, .5], [.5, .5, 0]])
_BUFFALO_FILES = ("det_10g.onnx", "w600k_r50.onnx")  # insightface's buffalo_l detector and ArcFace recognizer


def _insightface_models(model_dir, device):
    """insightface's face detector and ArcFace recognizer from buffalo_l's ONNX files."""
    try:
        from insightface.model_zoo import get_model
    except ImportError:
        raise ImportError("IdentityFilter needs insightface for face detection and ArcFace embeddings: "
                          "pip install insightface onnxruntime (or onnxruntime-gpu)") from None
    dirs = [model_dir] if model_dir else ["models/face_id/buffalo_l",
                                         os.path.expanduser("~/.insightface/models/buffalo_l")]
    found = next((d for d in dirs if all(os.path.isfile(os.path.join(d, f)) for f in _BUFFALO_FILES)), None)
    if found is None:
        raise FileNotFoundError(
            f"IdentityFilter needs insightface's buffalo_l models {' and '.join(_BUFFALO_FILES)} in one of "
            f"{dirs}; `python -c \"from insightface.app import FaceAnalysis; FaceAnalysis(name='buffalo_l')\"` "
            "downloads them to ~/.insightface/models/buffalo_l (mind their non-commercial licence)")
    ctx = 0 if torch.device(device).type == "cuda" else -1
    detector = get_model(os.path.join(found, _BUFFALO_FILES[0]))
    detector.prepare(ctx_id=ctx, input_size=(640, 640), det_thresh=0.5)
    recognizer = get_model(os.path.join(found, _BUFFALO_FILES[1]))
    recognizer.prepare(ctx_id=ctx)
    return detector, recognizer


class IdentityFilter(BaseFilter):
    """Face identity: the unit ArcFace embedding (512 channels) of each detected face painted into its box on the
    H/32×W/32 latent grid, zeros elsewhere; up to `max_faces` faces, each dropped with `p_drop`, and a lone face
    fills the whole grid with `p_full` (upstream's training augmentations; 0 at inference).

    `detector.detect(bgr_uint8, max_num=)` → (N×5 boxes x1, y1, x2, y2, score in pixels; N×5×2 keypoints) and
    `recognizer.get(bgr_uint8, face)` → 512 numbers follow insightface's model_zoo API; both default to
    insightface's buffalo_l models (an optional dependency: without it, or its model files, a clear error).
    """

    def __init__(self, device="cpu", max_faces=4, p_drop=0.05, p_full=0.3, detector=None, recognizer=None,
                 model_dir=None):
        super().__init__(device)
        self.max_faces, self.p_drop, self.p_full = max_faces, p_drop, p_full
        if detector is None or recognizer is None:
            detector, recognizer = _insightface_models(model_dir, self.device)
        self.detector, self.recognizer = detector, recognizer

    def num_channels(self):
        return 512

    def faces(self, image):
        """One 3×H×W [0,1] image → pixel boxes N×4 (x1, y1, x2, y2) and unit embeddings N×512."""
        rgb = image.detach().float().clamp(0, 1).mul(255).to("cpu", torch.uint8).permute(1, 2, 0).numpy()
        bgr = rgb[..., ::-1].copy()
        boxes, kps = self.detector.detect(bgr, max_num=self.max_faces)
        ids = torch.zeros(len(boxes), 512)
        for i in range(len(boxes)):
            face = SimpleNamespace(bbox=boxes[i, :4], kps=None if kps is None else kps[i], det_score=boxes[i, 4])
            ids[i] = torch.as_tensor(self.recognizer.get(bgr, face), dtype=torch.float32).flatten()
        return torch.as_tensor(boxes[:, :4], dtype=torch.float32).reshape(-1, 4), F.normalize(ids, dim=1)

    def __call__(self, x, generator=None):
        B, _, H, W = x.shape
        grid = torch.zeros(B, 512, H // 32, W // 32)
        for i in range(B):
            boxes, ids = self.faces(x[i])
            for j in range(len(boxes)):
                if _rand(generator) < self.p_drop:
                    continue
                sx, sy, ex, ey = (boxes[j] / 32).clamp(min=0).round().int().tolist()
                ex, ey = max(ex, sx + 1), max(ey, sy + 1)
                if len(boxes) == 1 and _rand(generator) < self.p_full:
                    sx, sy, ex, ey = 0, 0, W // 32, H // 32
                grid[i, :, sy:ey, sx:ex] = ids[j, :, None, None]
        return grid.to(self.device)  # B, 512, H/32, W/32

    def preview(self, images, control):
        """The image with each face's cells tinted in its own colour (faces told apart by their embeddings)."""
        out = images.detach().float().clamp(0, 1).clone()
        cells = control.detach().float().cpu()
        for i in range(cells.shape[0]):
            vectors = cells[i].flatten(1).T  # h·w, 512
            painted = vectors.abs().sum(1) > 0
            if not painted.any():
                continue
            unique, which = torch.unique(vectors[painted], dim=0, return_inverse=True)
            label = torch.full((vectors.shape[0],), -1)
            label[painted] = which
            label = label.view(1, 1, *cells.shape[-2:]).float()
            label = F.interpolate(label, size=images.shape[-2:], mode="nearest")[0, 0].long().to(out.device)
            for k in range(len(unique)):
                inside = label == k
                color = _ID_COLORS[k % len(_ID_COLORS)].to(out.device)[:, None]
                out[i][:, inside] = (out[i][:, inside] + color) / 2
        return out


FILTERS = {cls.__name__: cls for cls in (BaseFilter, CannyFilter, InpaintFilter, SREffnetFilter, IdentityFilter)}


def build_filter(name, device="cpu", params=None, effnet=None):
    """A filter from upstream's config keys `controlnet_filter` and `controlnet_filter_params`; an EfficientNet
    already in memory is shared with SREffnetFilter instead of loading a second one."""
    if name not in FILTERS:
        raise ValueError(f"unknown controlnet_filter {name!r}; known filters: {', '.join(FILTERS)}")
    params = dict(params or {})
    if FILTERS[name] is SREffnetFilter and effnet is not None:
        params.setdefault("effnet", effnet)
    try:
        return FILTERS[name](device, **params)
    except TypeError as e:
        raise ValueError(f"controlnet_filter_params for {name}: {e}") from None
