"""The one way to compute Stable Cascade's conditions, shared by training and inference (SPEC §3).

Training and inference both call these functions, so the two cannot drift apart (upstream's notebooks
reuse the trainers' `get_conditions` for the same reason).
"""
import gzip
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_VOCAB_SIZE = 49408
MAX_TOKENS = 77
DOWNLOAD_HINT = "bash models/download_models.sh clip"


class ConditioningError(ValueError):
    """Bad conditioning input or missing encoder files; the message says what to do."""


# ----------------------------------------------------------------------------------------------- tokenizer
def _open_clip_bpe_path():
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError as e:  # pragma: no cover - open_clip is pinned in requirements.txt
        raise ConditioningError("open_clip_torch is needed to build the CLIP tokenizer offline: "
                                "pip install -r requirements.txt") from e
    return default_bpe()


@lru_cache(maxsize=1)
def _open_clip_vocab_and_merges():
    """CLIP's BPE table as shipped inside open_clip: 256 bytes, 256 word-final bytes, 48,894 merges, 2 specials."""
    from open_clip.tokenizer import bytes_to_unicode
    with gzip.open(_open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(path=None):
    """The CLIP tokenizer: from a downloaded folder's files when `path` holds them, else from open_clip's vocabulary.

    Built from open_clip it pads with id 0 (`!`) like open_clip does, which is what the bigG tokenizer files
    are believed to specify (SPEC §3). Stage C attends to all 77 positions, so the pad id matters.
    """
    from transformers import CLIPTokenizer
    if path is not None and os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        tok = CLIPTokenizer.from_pretrained(path)
    else:
        vocab, merges = _open_clip_vocab_and_merges()
        tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")
        # transformers silently builds a near-empty tokenizer when it cannot read a vocabulary; never go on with one.
        if len(tok) != CLIP_VOCAB_SIZE:
            raise ConditioningError(f"CLIP tokenizer built from open_clip has {len(tok)} tokens, expected "
                                    f"{CLIP_VOCAB_SIZE}: reinstall the pinned requirements")
    tok.model_max_length = MAX_TOKENS
    return tok


def tokenize(tokenizer, captions, max_length=MAX_TOKENS):
    """Pad to `max_length` and truncate, warning (once per call) when a caption loses tokens."""
    if isinstance(captions, str):
        captions = [captions]
    if not all(isinstance(c, str) for c in captions):
        raise ConditioningError(f"captions must be strings, got {[type(c).__name__ for c in captions]}")
    full = tokenizer(captions, truncation=False, padding=False)["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        warnings.warn(f"{len(too_long)} caption(s) exceed CLIP's {max_length} tokens and were truncated "
                      f"(e.g. caption {too_long[0]} has {len(full[too_long[0]])} tokens)", stacklevel=2)
    return tokenizer(captions, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt")


# ------------------------------------------------------------------------------------------------- encoders
def _require_dir(path, what):
    if path is None or not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ConditioningError(f"{what} not found at '{path}' (needs config.json and weights). "
                                f"Download it with: {DOWNLOAD_HINT}")


def load_text_encoder(path, dtype=torch.float32, device="cpu"):
    """CLIP ViT-bigG/14 text tower with projection (`CLIPTextModelWithProjection`) from a local folder."""
    from transformers import CLIPTextModelWithProjection
    _require_dir(path, "CLIP text encoder")
    model = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def load_vision_encoder(path, dtype=torch.float32, device="cpu"):
    """CLIP ViT-L/14 image tower with projection (`CLIPVisionModelWithProjection`) from a local folder."""
    from transformers import CLIPVisionModelWithProjection
    _require_dir(path, "CLIP image encoder")
    model = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def tiny_text_config(hidden=32, projection=32, layers=2, heads=2):
    """A small random CLIP text config with the real vocabulary, for tests and the tiny preset."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
                          projection_dim=projection, num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=MAX_TOKENS, hidden_act="gelu", pad_token_id=0,
                          bos_token_id=49406, eos_token_id=49407)


def tiny_vision_config(hidden=32, projection=32, layers=2, heads=2, image_size=224, patch_size=32):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, projection_dim=projection,
                            num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
                            patch_size=patch_size, hidden_act="gelu")


def random_text_encoder(config, seed=0):
    from transformers import CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def random_vision_encoder(config, seed=0):
    from transformers import CLIPVisionModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ conditions
def encode_text(text_model, tokenizer, captions, device=None, grad=False):
    """Stage C's text conditions for a list of captions.

    Returns `clip_text` = the last encoder layer's output BEFORE the final LayerNorm (B×77×C, i.e.
    `hidden_states[-1]`, not `last_hidden_state`) and `clip_text_pooled` = projected `text_embeds` (B×1×C').
    Each distinct caption runs through the encoder once. Without `grad` the outputs are plain no-grad tensors
    (usable in training as constants); with it, gradients reach trainable parts such as LoRA's token deltas.
    """
    if isinstance(captions, str):
        captions = [captions]
    device = device if device is not None else next(text_model.parameters()).device
    unique = list(dict.fromkeys(captions))
    tokens = tokenize(tokenizer, unique)
    index = torch.tensor([unique.index(c) for c in captions], device=device)
    with torch.set_grad_enabled(grad):  # also inside a caller's no_grad block: a trainer asks for gradients here
        out = text_model(input_ids=tokens["input_ids"].to(device),
                         attention_mask=tokens["attention_mask"].to(device), output_hidden_states=True)
        return {"clip_text": out.hidden_states[-1].index_select(0, index),
                "clip_text_pooled": out.text_embeds.unsqueeze(1).index_select(0, index)}


def _check_images(images):
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConditioningError(f"expected an image batch B×3×H×W in [0,1], got {shape}")


def clip_image_preprocess(images):
    """CLIP's preprocessing: shorter side to 224 (bicubic, antialiased), centre crop 224, CLIP mean/std."""
    _check_images(images)
    h, w = images.shape[-2:]
    scale = 224 / min(h, w)
    size = (max(224, round(h * scale)), max(224, round(w * scale)))
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def encode_clip_image(vision_model, images):
    """`clip_img` for image variation: projected CLIP image embeddings, B×1×768 for ViT-L/14."""
    param = next(vision_model.parameters())
    pixels = clip_image_preprocess(images).to(device=param.device, dtype=param.dtype)
    return vision_model(pixel_values=pixels).image_embeds.unsqueeze(1)


def effnet_preprocess(images):
    """The EfficientNet encoder's input: [0,1] images normalised with ImageNet mean/std."""
    _check_images(images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std

