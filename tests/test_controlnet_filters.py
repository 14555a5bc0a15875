"""ControlNet filters: Canny edges where the shapes are, pixel-exact user masks, the saliency network's file layout,
SR latents, identity embeddings in their face boxes, and clear errors for the optional dependencies."""
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from core.weights import CheckpointError
from modules.controlnet_filters import (CannyFilter, IdentityFilter, InpaintFilter, SREffnetFilter, build_filter,
                                        gaussian_blur, random_masks)
from modules.presets import build_model
from modules.saliency import SaliencyNet, load_saliency_net


@pytest.fixture(scope="module")
def photo():
    """scikit-image's astronaut, 512² → 256×192 (non-square on purpose), as 1×3×H×W in [0,1]."""
    from skimage.data import astronaut
    x = torch.from_numpy(astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(256, 192), mode="bilinear", antialias=True).clamp(0, 1)


@pytest.fixture(scope="module")
def tiny_effnet(photo):
    """A random encoder with BatchNorm statistics of the photo: untouched ones shrink its features to denormal
    numbers, which crawl on a CPU."""
    effnet = build_model("effnet", "tiny")
    for bn in (m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None
    with torch.no_grad():
        effnet.train()(F.interpolate(photo, size=(64, 64), mode="bilinear"))
    return effnet.eval()


# ------------------------------------------------------------------------------------------------------- Canny
def _shapes(size):
    """A grey image with a bright rectangle and a dark disc, and the label map the image was drawn from."""
    h = w = size
    s = size / 224
    ys, xs = np.mgrid[:h, :w]
    labels = np.zeros((h, w), np.int64)
    labels[int(40 * s):int(100 * s), int(30 * s):int(120 * s)] = 1
    labels[(ys - 160 * s) ** 2 + (xs - 150 * s) ** 2 <= (35 * s) ** 2] = 2
    levels = np.array([0.5, 0.95, 0.1])
    image = torch.from_numpy(levels[labels]).float().expand(3, -1, -1)[None].clone()
    return image, labels


def _boundary(labels, radius):
    """Pixels within `radius` of a place where the label changes."""
    change = np.zeros_like(labels, dtype=bool)
    change[:-1] |= labels[:-1] != labels[1:]
    change[1:] |= labels[:-1] != labels[1:]
    change[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    change[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    band = torch.from_numpy(change).float()[None, None]
    return F.max_pool2d(band, 2 * radius + 1, stride=1, padding=radius)[0, 0].bool().numpy(), change


@pytest.mark.parametrize("size,radius", [(224, 1), (448, 3)])
def test_canny_finds_the_drawn_edges_and_nothing_else(size, radius):
    image, labels = _shapes(size)
    edges = CannyFilter()(image)
    assert edges.shape == (1, 1, size, size) and edges.min() >= 0 and edges.max() <= 1
    found = edges[0, 0].numpy() > 0
    near, change = _boundary(labels, radius)
    assert found.any() and not (found & ~near).any()  # no edge away from the shapes' outlines
    reach, _ = _boundary(found.astype(np.int64), radius)  # every outline pixel has an edge close by
    assert (reach[change]).mean() > 0.97
    for shape in (1, 2):  # both shapes, not just one
        assert found[_boundary((labels == shape).astype(np.int64), radius)[0]].sum() > 20
    assert CannyFilter()(torch.full((1, 3, size, size), 0.3)).count_nonzero() == 0


def test_canny_is_upstreams_recipe_to_the_bit(photo):
    import cv2
    x = torch.rand(2, 3, 64, 80)
    out = CannyFilter(resize=224)(x)
    small = F.interpolate(x, size=(224, 224), mode="bilinear")
    for i in range(2):
        raw = cv2.Canny((small[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8), 100, 200)
        expect = F.interpolate(torch.from_numpy(raw)[None, None].float() / 255, size=(64, 80), mode="bilinear")
        assert torch.equal(out[i:i + 1], expect)
    assert torch.equal(CannyFilter(resize=None)(photo).unique(), torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------------------------- every filter
class FakeDetector:
    """insightface's detector API: fixed boxes (x1, y1, x2, y2, score) and keypoints; records its inputs."""

    def __init__(self, boxes):
        self.boxes, self.seen = np.array(boxes, np.float32).reshape(-1, 5), []

    def detect(self, bgr, max_num):
        self.seen.append((bgr, max_num))
        return self.boxes, np.zeros((len(self.boxes), 5, 2), np.float32)


class FakeRecognizer:
    """insightface's recognizer API: a known (unnormalised) vector per face, keyed by the box's left edge."""

    def __init__(self, vectors):
        self.vectors = vectors

    def get(self, bgr, face):
        return self.vectors[int(face.bbox[0])]


def test_every_filter_on_a_real_photo_has_its_shape_channels_and_range(photo, tiny_effnet):
    x = photo.repeat(2, 1, 1, 1)
    detector, recognizer = FakeDetector([[40, 32, 120, 128, 0.9]]), FakeRecognizer({40: np.ones(512)})
    filters = {
        "canny": CannyFilter(), "inpaint": InpaintFilter(saliency_path="absent.pt"),
        "sr": SREffnetFilter(effnet=tiny_effnet),
        "identity": IdentityFilter(p_drop=0, p_full=0, detector=detector, recognizer=recognizer),
    }
    sizes = {"canny": (256, 192), "inpaint": (256, 192), "sr": (8, 6), "identity": (8, 6)}
    with pytest.warns(UserWarning, match="random brush and box masks"):
        controls = {name: f(x) for name, f in filters.items()}
    for name, f in filters.items():
        c = controls[name]
        assert c.shape == (2, f.num_channels(), *sizes[name]) and torch.isfinite(c).all(), name
        preview = f.preview(x, c)
        assert preview.shape == x.shape and preview.min() >= 0 and preview.max() <= 1, name
    assert [f.num_channels() for f in filters.values()] == [1, 4, 16, 512]
    assert controls["canny"].min() >= 0 and controls["canny"].max() == 1
    inpaint = controls["inpaint"]
    assert inpaint[:, :3].min() >= 0 and inpaint[:, :3].max() <= 1
    assert set(inpaint[:, 3].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(inpaint[:, :3], torch.where(inpaint[:, 3:].bool(), 1.0, x))
    norms = controls["identity"].norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones(())) and (norms == 0).any()


def test_sr_filter_is_effnet_latents_of_the_half_size_image_upsampled_nearest(photo, tiny_effnet):
    from core.conditioning import effnet_preprocess
    out = SREffnetFilter(effnet=tiny_effnet)(photo)
    with torch.no_grad():
        half = tiny_effnet(effnet_preprocess(F.interpolate(photo, size=(128, 96), mode="nearest")))
    torch.testing.assert_close(out, half.repeat_interleave(2, -2).repeat_interleave(2, -1))
    # at inference the low-res image is upsampled ×2 (nearest) first: the filter's own ½ undoes it exactly
    up = F.interpolate(photo, scale_factor=2, mode="nearest")
    assert torch.equal(F.interpolate(up, scale_factor=0.5, mode="nearest"), photo)
    assert SREffnetFilter(effnet=tiny_effnet).output_scale == 2


# ------------------------------------------------------------------------------------------------- inpainting
def test_user_mask_is_honoured_pixel_exactly_and_outpaint_inverts_it():
    x = torch.rand(2, 3, 40, 56)
    mask = torch.rand(1, 1, 40, 56) > 0.6  # noise: any smoothing or resizing would show
    f = InpaintFilter(saliency_path="absent.pt")
    out = f(x, mask=mask)
    assert out.shape == (2, 4, 40, 56)
    assert torch.equal(out[:, 3:].bool(), mask.expand(2, -1, -1, -1))
    assert torch.equal(out[:, :3], torch.where(mask, torch.ones_like(x), x))
    outpaint = f(x, mask=mask, outpaint=True)
    assert torch.equal(outpaint[:, 3:].bool(), ~mask.expand(2, -1, -1, -1))
    assert torch.equal(outpaint[:, :3], torch.where(~mask, torch.ones_like(x), x))
    assert torch.equal(f(x, mask=mask[0, 0].float())[:, 3:], out[:, 3:])  # H×W float masks: > 0.5
    with pytest.raises(ValueError, match="mask must be"):
        f(x, mask=mask[..., :50])


# Upstream's saliency_model.pt (modules/cnet_modules/inpainting/): every key and shape, as read from the file.
SALIENCY_LAYOUT = {
    **{f"downsampler.{i}.{p}": s for i, c_in, c, k in ((1, 3, 8, 9), (5, 8, 16, 3), (9, 16, 32, 3))
       for p, s in (("weight", (c, c_in, k, k)), ("bias", (c,)))},
    **{f"downsampler.{i + 1}.{p}": (c,) for i, c in ((1, 8), (5, 16), (9, 32)) for p in ("weight", "bias")},
    **{f"residual.{r}.resblock.{i}.{p}": s for r, c in ((0, 32), (2, 64)) for i in (1, 5)
       for p, s in (("weight", (c, c, 3, 3)), ("bias", (c,)))},
    **{f"residual.{r}.resblock.{i + 1}.{p}": (c,) for r, c in ((0, 32), (2, 64)) for i in (1, 5)
       for p in ("weight", "bias")},
    "residual.1.weight": (64, 1, 1, 1),
    "segmentator.1.weight": (16, 64, 3, 3), "segmentator.1.bias": (16,), "segmentator.2.weight": (16,),
    "segmentator.2.bias": (16,), "segmentator.6.weight": (1, 16, 9, 9), "segmentator.6.bias": (1,),
}


def test_saliency_net_has_upstreams_layout_and_reads_its_legacy_pickle(tmp_path):
    net = SaliencyNet()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == SALIENCY_LAYOUT
    assert len(SALIENCY_LAYOUT) == 35
    path = tmp_path / "saliency_model.pt"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)  # the format upstream's file uses
    loaded = load_saliency_net(str(path))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 240, 320)
    out = loaded(x)
    assert out.shape == (1, 1, 30, 40) and out.min() > 0 and out.max() < 1
    torch.testing.assert_close(out, net.eval()(x))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": types.SimpleNamespace()}, evil)
    with pytest.raises(ValueError, match="cannot read the saliency weights"):
        load_saliency_net(str(evil))
    with pytest.raises(FileNotFoundError, match="download_models.sh controlnet saliency"):
        load_saliency_net(str(tmp_path / "missing.pt"))


def test_training_masks_come_from_the_thresholded_saliency_map(tmp_path, photo):
    path = tmp_path / "saliency_model.pt"
    torch.save(SaliencyNet().state_dict(), path)
    f = InpaintFilter(saliency_path=str(path), p_outpaint=0.0)
    assert f.mask_source == "saliency"
    saliency = load_saliency_net(str(path))(TF.resize(photo, 240, antialias=True))
    lo, hi = saliency.quantile(0.3).item(), saliency.quantile(0.7).item()
    small, large = f(photo, threshold=hi)[:, 3].bool(), f(photo, threshold=lo)[:, 3].bool()
    assert (small & ~large).sum() == 0 and large.sum() > small.sum() > 0  # higher threshold: smaller region
    # the region is where the saliency exceeds the threshold, smoothed: compare at the saliency map's scale
    coarse = F.interpolate(large[:, None].float(), size=saliency.shape[-2:], mode="area")[0, 0]
    above = (saliency > lo)[0, 0]
    assert ((coarse > 0.5) == above).float().mean() > 0.85
    outpaint = f(photo, threshold=lo, outpaint=True)[:, 3].bool()
    assert (outpaint == ~large).float().mean() > 0.999  # inverted before smoothing; ties at exactly 0.5 aside
    always = InpaintFilter(saliency_path=str(path), p_outpaint=1.0)(photo, threshold=lo)[:, 3].bool()
    assert torch.equal(always, outpaint)


def test_without_saliency_weights_random_masks_stand_in(photo):
    f = InpaintFilter(saliency_path="absent.pt")
    assert f.mask_source == "random"
    x = photo.repeat(8, 1, 1, 1)
    with pytest.warns(UserWarning, match="no saliency weights at absent.pt, using random brush and box masks"):
        a = f(x, generator=torch.Generator().manual_seed(0))
    b = f(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    cover = a[:, 3].mean(dim=(1, 2))
    assert (cover > 0.02).all() and (cover < 0.98).all() and cover.std() > 0.02
    masks = random_masks(64, 48, 64, torch.Generator().manual_seed(1))
    assert masks.shape == (64, 1, 32, 43) and 0.05 < masks.float().mean() < 0.9


def test_separable_blur_equals_torchvisions():
    x = (torch.rand(2, 1, 50, 70) > 0.5).float()
    for k in (3, 9, 31):
        torch.testing.assert_close(gaussian_blur(x, k), TF.gaussian_blur(x, k), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- identity
def test_identity_filter_paints_embeddings_into_their_face_boxes():
    vectors = {40: np.arange(512, dtype=np.float32) + 1, 200: -3 * np.ones(512, np.float32)}
    boxes = [[40, 70, 110, 140, 0.9], [200, 0, 250, 60, 0.8]]  # x1, y1, x2, y2 in pixels
    detector, recognizer = FakeDetector(boxes), FakeRecognizer(vectors)
    f = IdentityFilter(max_faces=3, p_drop=0, p_full=0, detector=detector, recognizer=recognizer)
    x = torch.rand(1, 3, 192, 288)
    out = f(x)
    assert out.shape == (1, 512, 6, 9)
    first = torch.from_numpy(vectors[40] / np.linalg.norm(vectors[40]))
    second = torch.from_numpy(vectors[200] / np.linalg.norm(vectors[200]))
    # boxes / 32, rounded: (1.25, 2.19, 3.44, 4.38) → x 1..3, y 2..4 and (6.25, 0, 7.81, 1.88) → x 6..8, y 0..2
    expect = torch.zeros(512, 6, 9)
    expect[:, 2:4, 1:3] = first[:, None, None]
    expect[:, 0:2, 6:8] = second[:, None, None]
    torch.testing.assert_close(out[0], expect)
    bgr, max_num = detector.seen[0]
    assert max_num == 3 and bgr.dtype == np.uint8 and bgr.shape == (192, 288, 3)
    assert np.array_equal(bgr[..., 0], (x[0, 2] * 255).to(torch.uint8).numpy())  # blue first, as OpenCV expects
    preview = f.preview(x, out)
    assert not torch.equal(preview[..., 64:128, 32:96], x[..., 64:128, 32:96])  # tinted inside the boxes
    assert torch.equal(preview[..., 160:, :], x[..., 160:, :])  # untouched elsewhere

    lone = IdentityFilter(p_drop=0, p_full=1, detector=FakeDetector(boxes[:1]), recognizer=recognizer)
    assert torch.allclose(lone(x)[0], first[:, None, None].expand(-1, 6, 9))  # a lone face may fill the grid
    dropped = IdentityFilter(p_drop=1, p_full=0, detector=detector, recognizer=recognizer)
    assert dropped(x).count_nonzero() == 0


def test_identity_filter_without_insightface_or_its_models_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "insightface", None)  # not installed (whatever this machine has)
    monkeypatch.setitem(sys.modules, "insightface.model_zoo", None)
    with pytest.raises(ImportError, match="pip install insightface onnxruntime"):
        IdentityFilter()
    zoo = types.ModuleType("insightface.model_zoo")
    zoo.get_model = lambda path: pytest.fail("no model file exists to load")
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.model_zoo", zoo)
    with pytest.raises(FileNotFoundError, match="buffalo_l models det_10g.onnx and w600k_r50.onnx"):
        IdentityFilter(model_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ construction
def test_filters_build_from_upstreams_config_keys(tiny_effnet):
    assert build_filter("CannyFilter", params={"resize": 128}).resize == 128
    inpaint = build_filter("InpaintFilter", params={"threshold": [0.1, 0.2], "p_outpaint": 0.0})
    assert inpaint.threshold == (0.1, 0.2) and inpaint.p_outpaint == 0.0
    assert build_filter("SREffnetFilter", params={"scale_factor": 0.5}, effnet=tiny_effnet).effnet is tiny_effnet
    with pytest.raises(ValueError, match="unknown controlnet_filter 'EdgeFilter'"):
        build_filter("EdgeFilter")
    with pytest.raises(ValueError, match="controlnet_filter_params for CannyFilter.*radius"):
        build_filter("CannyFilter", params={"radius": 3})
    with pytest.raises(CheckpointError, match="download_models.sh"):
        build_filter("SREffnetFilter", params={"effnet_checkpoint_path": "absent.safetensors"})


def test_importing_filters_and_stage_c_pulls_in_no_optional_dependency():
    code = ("import sys, modules.controlnet_filters, modules.saliency, modules.stage_c, modules.controlnet; "
            "print(sorted(m for m in ('cv2', 'insightface', 'kornia') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
