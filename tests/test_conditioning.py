"""Conditioning against direct transformers calls and open_clip's tokenizer (SPEC §3)."""
import pytest
import torch

from core.conditioning import (CLIP_VOCAB_SIZE, ConditioningError, build_tokenizer, clip_image_preprocess,
                               effnet_preprocess, encode_clip_image, encode_text, load_text_encoder,
                               random_text_encoder, random_vision_encoder, tiny_text_config,
                               tiny_vision_config)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_is_clip_bpe_padding_with_zero(tokenizer):
    import open_clip
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer.pad_token_id == 0
    captions = ["a photo of a cat", "", "An astronaut riding a horse on Mars, 4k"]
    ours = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], open_clip.tokenize(captions))


def test_encode_text_matches_direct_transformers_call(tokenizer):
    model = random_text_encoder(tiny_text_config(), seed=1)
    captions = ["a red square", "a blue circle", "a red square", ""]
    cond = encode_text(model, tokenizer, captions)
    tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, output_hidden_states=True)
    # hidden_states[-1] is the last layer BEFORE the final LayerNorm: it must differ from last_hidden_state
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(cond["clip_text"], out.hidden_states[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["clip_text_pooled"], out.text_embeds[:, None], rtol=1e-5, atol=1e-6)
    assert cond["clip_text"].shape == (4, 77, 32) and cond["clip_text_pooled"].shape == (4, 1, 32)


def test_encode_text_runs_each_caption_once(tokenizer):
    model = random_text_encoder(tiny_text_config())
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    encode_text(model, tokenizer, ["x", "x", "y", "x"])
    assert seen == [2]


def test_overlong_caption_is_truncated_with_a_warning(tokenizer):
    model = random_text_encoder(tiny_text_config())
    with pytest.warns(UserWarning, match="truncated"):
        cond = encode_text(model, tokenizer, ["word " * 200])
    assert cond["clip_text"].shape[1] == 77


def test_clip_image_preprocess_resizes_shorter_side_and_crops():
    img = torch.rand(2, 3, 300, 448)
    x = clip_image_preprocess(img)
    assert x.shape == (2, 3, 224, 224)
    # a constant grey image maps to (0.5 - mean) / std per channel
    grey = clip_image_preprocess(torch.full((1, 3, 256, 256), 0.5))
    from core.conditioning import CLIP_MEAN, CLIP_STD
    expect = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(grey.mean((0, 2, 3)), expect, rtol=1e-4, atol=1e-4)
    vision = random_vision_encoder(tiny_vision_config())
    assert encode_clip_image(vision, img).shape == (2, 1, 32)


def test_effnet_preprocess_is_imagenet_normalisation():
    x = torch.rand(1, 3, 8, 8)
    y = effnet_preprocess(x)
    torch.testing.assert_close(y[0, 1], (x[0, 1] - 0.456) / 0.224)


def test_bad_inputs_give_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ConditioningError, match="download_models.sh"):
        load_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(ConditioningError, match="B×3×H×W"):
        effnet_preprocess(torch.rand(3, 8, 8))
    with pytest.raises(ConditioningError, match="strings"):
        encode_text(random_text_encoder(tiny_text_config()), tokenizer, [None])
