"""LoRA training on a frozen Stage C: `python train/train_c_lora.py configs/training/finetune_c_3b_lora.yaml [k=v]`.

Rank-r adapters go on the Stage C weights that `module_filters` select; `train_tokens` adds new tokens (`[name]` or
`<name>`) to the tokenizer and the CLIP token table, each starting as the mean of the vocabulary rows its regex
matches, and learns their rows as ReToken deltas (other entries are regexes that pick existing tokens to re-learn).
Stage C and the text encoder stay frozen, Stage C in eval mode; the conditions and loss are Stage C's
(`WurstCoreC`). Only the LoRA is saved, in the released layout, its tokens, filters and rank in the file's metadata,
so `python -m inference.generate --lora <checkpoint>/lora.safetensors` uses it as it is.
"""
import dataclasses
import os
import sys
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.conditioning import encode_text  # noqa: E402
from core.config import EXPECTED, ConfigError  # noqa: E402
from core.warpcore import WarpCore  # noqa: E402
from core.weights import load_state_dict_file  # noqa: E402
from inference.lora import add_tokens, lora_metadata, text_token_ids  # noqa: E402
from modules.lora import apply_lora, apply_retoken, lora_disabled  # noqa: E402
from train.base import main  # noqa: E402
from train.train_c import WurstCoreC  # noqa: E402


class LoraCore(WurstCoreC):
    """Trains a LoRA and new tokens for Stage C (upstream's notebook name: `from train import LoraCore`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(WurstCoreC.Config):
        module_filters: list[str] = EXPECTED  # Stage C modules whose weights get adapters; upstream: ['.attn']
        rank: int = EXPECTED
        train_tokens: list = EXPECTED  # [[token, init_regex], ...], e.g. [['[fernando]', '^dog</w>']]
        lora_checkpoint_path: Optional[str] = None  # a LoRA file to start from (or to sample with)
        # Samples whose caption names none of the train tokens learn the frozen Stage C's own prediction (the LoRA
        # switched off) instead of the data's target: prompts without the tokens then keep their images, where
        # fitting the data would teach the LoRA to redraw them too.
        preserve_base: bool = False
        # Their loss weight. Guidance multiplies a change of the conditional prediction by the CFG scale, so a
        # LoRA that barely moves it still moves the guided image: about CFG² holds it there.
        preserve_base_weight: float = 1.0
        # A LoRA that acts only where a train token is (the file says so, and inference runs Stage C without it for
        # other prompts and for the unconditional branch): prompts without the tokens keep their images exactly.
        # Training learns from the samples whose caption holds a token; the others, the LoRA off for them at
        # inference, carry no loss (so leave them out of the data and set caption_dropout: 0).
        token_gated: bool = False

        def __post_init__(self):
            super().__post_init__()
            if self.token_gated and self.preserve_base:
                raise ConfigError("token_gated and preserve_base exclude each other: a token-gated LoRA never acts "
                                  "on prompts without its tokens, so there is nothing to preserve")

    @dataclasses.dataclass
    class Models(WurstCoreC.Models):
        lora: nn.Module = None  # ModuleDict(embeddings=ReToken, weights=[LoRA, ...]): the released layout

    @dataclasses.dataclass
    class Optimizers(WarpCore.Optimizers):  # the LoRA's only: Stage C has none
        lora: Any = None

    @dataclasses.dataclass
    class Schedulers(WarpCore.Schedulers):
        lora: Any = None

    FROZEN_GENERATOR_FOR = "a LoRA"

    def trained_models(self):
        return ["lora"]

    def setup_models(self, extras):
        """Stage C's models, then the tokens and the adapters (in fp32 on any base dtype: they are what learns)."""
        if self.env.is_distributed:
            raise ConfigError("LoRA training runs in one process (as upstream's); start it without torchrun")
        models = super().setup_models(extras)
        cfg = self.config
        ids = sorted(set(add_tokens(models.tokenizer, models.text_model, cfg.train_tokens).values()))
        retoken = apply_retoken(models.text_model.get_input_embeddings(), ids)
        loras = apply_lora(models.generator, filters=cfg.module_filters, rank=cfg.rank)
        if not loras:
            raise ConfigError(f"module_filters {cfg.module_filters} select no weight of Stage C")
        lora = nn.ModuleDict({"embeddings": retoken, "weights": nn.ModuleList(loras)}).to(self.device, torch.float32)
        if cfg.lora_checkpoint_path is not None:
            self._load_lora(lora, cfg.lora_checkpoint_path)
        models.lora = lora.requires_grad_(cfg.training).train(cfg.training)
        return models

    @staticmethod
    def _load_lora(lora, path):
        """A LoRA file for the same filters, rank and tokens, its token rows put in this run's id order."""
        state = load_state_dict_file(path)
        ours = lora["embeddings"].indices.tolist()
        theirs = state["embeddings.indices"].tolist() if "embeddings.indices" in state else []
        if sorted(theirs) != ours:
            raise ConfigError(f"{path} trains token ids {theirs} but train_tokens give {ours}")
        order = sorted(range(len(theirs)), key=theirs.__getitem__)  # upstream's files list them in set order
        state["embeddings.indices"] = state["embeddings.indices"][order]
        state["embeddings.embeddings"] = state["embeddings.embeddings"][order]
        try:
            lora.load_state_dict(state)
        except RuntimeError as e:
            details = "; ".join(line.strip() for line in str(e).splitlines()[1:])
            raise ConfigError(f"{path} does not fit this module_filters and rank: {details}") from None

    def training_target(self, batch, models, noised, noise_cond, conditions, target):
        if self.config.token_gated:  # only the rows the LoRA will act on learn
            tokens = models.lora["embeddings"].indices
            rows = torch.isin(text_token_ids(models.tokenizer, batch["captions"]).to(tokens.device), tokens)
            return target, rows.any(dim=1).float()
        if not self.config.preserve_base:
            return target, None
        tokens = [token for token, _ in self.config.train_tokens]
        plain = torch.tensor([not any(token in caption for token in tokens) for caption in batch["captions"]])
        if not plain.any():
            return target, None
        keep = plain.to(target.device)
        with lora_disabled(models.lora["weights"]), torch.no_grad():
            base = models.generator(noised[keep], noise_cond[keep], **{k: v[keep] if torch.is_tensor(v) else v
                                                                     for k, v in conditions.items()})
        target = target.clone()
        target[keep] = base.to(target.dtype)
        return target, torch.where(plain, self.config.preserve_base_weight, 1.0)

    def text_conditions(self, batch, models, is_unconditional=False, generators=None):
        """Stage C's text conditions, with gradients while training: the token deltas learn through the frozen text
        encoder."""
        captions = [""] * len(batch["captions"]) if is_unconditional else batch["captions"]
        return encode_text(models.text_model, models.tokenizer, captions, device=self.device,
                           grad=models.lora.training)

    def checkpoint_metadata(self, models):
        """The LoRA file names its tokens, filters and rank, so inference loads it without a config."""
        cfg = self.config
        meta = super().checkpoint_metadata(models)
        return {"lora": {**meta.get("lora", {}), **lora_metadata(cfg.train_tokens, cfg.module_filters, cfg.rank,
                                                                  token_gated=cfg.token_gated)}}


if __name__ == "__main__":
    main(LoraCore)
