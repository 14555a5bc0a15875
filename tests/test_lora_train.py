"""LoRA training on the tiny configs: the loss falls, only the adapters and token deltas change, the new token is one
id whose row is its initial row plus the learnt delta, and the saved file is the released layout with metadata that
inference reads back."""
import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch

from core.config import ConfigError
from core.data import ShardWriter
from core.weights import load_state_dict_file, read_metadata, save_model, save_state_dict_file
from inference.lora import apply_lora_file
from modules.lora import remove_lora
from modules.presets import build_model
from train.train_c_lora import LoraCore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LORA = os.path.join(ROOT, "configs", "training", "tiny_c_lora.yaml")
TOKEN = "[sks]"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models run several times faster on one thread than on two of a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A handful of generated images (a two-colour split) captioned with the new token, an EfficientNet encoder
    whose BatchNorm statistics come from images (untouched ones give ~1e-7 latents: nothing to learn), and a base
    Stage C."""
    d = tmp_path_factory.mktemp("lora_assets")
    rng = np.random.default_rng(0)
    with ShardWriter(str(d / "data" / "%06d.tar"), maxcount=8) as writer:
        for i in range(8):
            image = np.empty((64, 64, 3), dtype=np.uint8)
            cut = int(rng.integers(16, 48))
            image[:, :cut], image[:, cut:] = rng.integers(0, 256, size=(2, 3))
            writer.write({"__key__": f"{i:05d}", "txt": f"a photo of {TOKEN} split at {cut}",
                          "jpg": PIL.Image.fromarray(image)})
    torch.manual_seed(0)
    effnet = build_model("effnet", "tiny").eval()
    for bn in (m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # the plain average over one batch
        bn.train()
    with torch.no_grad():
        effnet(torch.rand(8, 3, 64, 64))
    save_model(effnet.eval(), d / "effnet.safetensors")
    stage_c = build_model("stage_c", "tiny")
    with torch.no_grad():  # a Stage C that uses its inputs: a fresh one zero-inits its output layer and gates
        for p in stage_c.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    save_model(stage_c, d / "stage_c.safetensors")
    return {"data": str(d / "data" / "000000.tar"), "effnet": str(d / "effnet.safetensors"),
            "stage_c": str(d / "stage_c.safetensors")}


def overrides(assets, tmp_path, **changes):
    base = {"webdataset_path": assets["data"], "effnet_checkpoint_path": assets["effnet"], "num_workers": 0,
            "generator_checkpoint_path": assets["stage_c"],
            "checkpoint_path": str(tmp_path / "ck"), "output_path": str(tmp_path / "out"), "sample_every": 0,
            "caption_dropout": 0, "clip_image_p": 0}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


class Recorder(LoraCore):
    """Keeps the models of a run, and a copy of every base weight as set-up left it."""

    def setup_models(self, extras):
        self.models = super().setup_models(extras)
        self.base = {name: frozen_state(getattr(self.models, name), self.models.lora)
                     for name in ("generator", "text_model")}
        return self.models


def frozen_state(model, lora):
    """Every tensor of `model` that is not an adapter or a token delta (the base weights, new token rows included)."""
    learnt = {id(p) for p in lora.parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in learnt}


def test_lora_learns_a_new_token_and_saves_only_itself(assets, tmp_path):
    core = Recorder(config_file_path=TINY_LORA, overrides=overrides(assets, tmp_path, updates=12, save_every=12))
    core()
    models, cfg = core.models, core.config
    extras = core.setup_extras_pre()
    batch = next(iter(core.setup_data(extras).dataloader))
    assert all(TOKEN in c for c in batch["captions"])

    def fixed_batch_loss():
        core.info.iter = 0  # the same noise and noise levels each time
        with torch.no_grad():
            return core.forward_pass(batch, extras, models)[0].mean().item()

    after = fixed_batch_loss()
    trained = {k: v.detach().clone() for k, v in models.lora.state_dict().items()}
    with torch.no_grad():  # back to the start: zero lora_down and zero token deltas are the identity
        for name, p in models.lora.named_parameters():
            if name.endswith(("lora_down", "embeddings")):
                p.zero_()
        before = fixed_batch_loss()
        models.lora.load_state_dict(trained)
    assert after < 0.9 * before, (before, after)

    # Stage C and the text encoder did not move, bit for bit
    for name in ("generator", "text_model"):
        now = frozen_state(getattr(models, name), models.lora)
        assert now.keys() == core.base[name].keys()
        assert all(torch.equal(now[k], v) for k, v in core.base[name].items()), name
    assert not models.generator.training

    # the new token: one id, its row = the mean of the vocabulary rows its regex matches + the learnt delta
    tokenizer, table = models.tokenizer, models.text_model.get_input_embeddings()
    ids = tokenizer(f"a photo of {TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids[-1] == 49408 and len(ids) == 4 and len(tokenizer) == table.num_embeddings == 49409
    assert models.text_model.config.vocab_size == 49409
    base_rows = table.parametrizations.weight.original
    dog = [i for t, i in tokenizer.get_vocab().items() if i < 49408 and re.search("^dog</w>", t)]
    torch.testing.assert_close(base_rows[49408], base_rows[dog].mean(0))
    delta = models.lora["embeddings"].embeddings[0]
    assert delta.abs().max() > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(table(torch.tensor([49408]))[0], base_rows[49408] + delta)

    # the checkpoint: the LoRA only, released layout and order, metadata naming tokens, filters and rank
    step = tmp_path / "ck" / cfg.experiment_id / "step_00000012"
    assert sorted(f for f in os.listdir(step) if f.endswith(".safetensors")) == ["lora.safetensors"]
    saved = load_state_dict_file(step / "lora.safetensors")
    n = 8  # the tiny Stage C's 4 AttnBlocks: out_proj and in-projection each
    assert list(saved) == ["embeddings.embeddings", "embeddings.indices"] + [
        f"weights.{i}.lora_{part}" for i in range(n) for part in ("down", "up")]
    assert saved["embeddings.indices"].tolist() == [49408]
    assert all(torch.equal(saved[k], v) for k, v in trained.items())
    meta = read_metadata(step / "lora.safetensors")
    assert json.loads(meta["train_tokens"]) == [[TOKEN, "^dog</w>"]]
    assert json.loads(meta["module_filters"]) == [".attn"] and json.loads(meta["rank"]) == 4

    # it reloads onto the base models through inference, and gives what training had
    x = (torch.randn(2, 16, 2, 2), torch.rand(2), torch.randn(2, 77, 32), torch.randn(2, 1, 24), torch.randn(2, 1, 16))
    prompt = tokenizer([f"a photo of {TOKEN}"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected_c, expected_text = models.generator(*x), models.text_model(**prompt).text_embeds
    remove_lora(models.generator, leave_parametrized=False)
    remove_lora(models.text_model, leave_parametrized=False)
    lora = apply_lora_file(models.generator, models.text_model, tokenizer, step / "lora.safetensors")
    assert lora.tokens == [TOKEN] and len(tokenizer) == 49409
    with torch.no_grad():
        torch.testing.assert_close(models.generator(*x), expected_c)
        torch.testing.assert_close(models.text_model(**prompt).text_embeds, expected_text)

    # and a run can start from it (lora_checkpoint_path), here in upstream's notebook mode
    config = {"model_version": "tiny", "clip_text_model_name": "tiny", "clip_image_model_name": "tiny",
              "effnet_checkpoint_path": assets["effnet"], "previewer_checkpoint_path": None,
              "generator_checkpoint_path": assets["stage_c"], "module_filters": [".attn"], "rank": 4,
              "train_tokens": [[TOKEN, "^dog</w>"]], "lora_checkpoint_path": str(step / "lora.safetensors")}
    notebook = LoraCore(config_dict=config, device="cpu", training=False)
    reloaded = notebook.setup_models(notebook.setup_extras_pre()).lora
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize("change,message", [
    ({"module_filters": "['.nothing']"}, r"module_filters \['.nothing'\] select no weight of Stage C"),
    ({"rank": 8}, r"does not fit this module_filters and rank: size mismatch for weights\.0\.lora_down"),
    ({"train_tokens": "[['[sks]', null], ['[other]', null]]"},
     r"trains token ids \[49408\] but train_tokens give \[49408, 49409\]"),
])
def test_config_errors_name_the_mismatch(assets, tmp_path, change, message):
    path = tmp_path / "start.safetensors"
    state = {"embeddings.embeddings": torch.zeros(1, 32), "embeddings.indices": torch.tensor([49408])}
    for i in range(8):
        width = 64 if i % 2 == 0 else 192  # out_proj, then the fused in-projection, of the tiny Stage C
        state[f"weights.{i}.lora_down"], state[f"weights.{i}.lora_up"] = torch.zeros(4, 64), torch.zeros(width, 4)
    save_state_dict_file(state, path)
    core = LoraCore(config_file_path=TINY_LORA, overrides=overrides(
        assets, tmp_path, lora_checkpoint_path=str(path), **change))
    with pytest.raises(ConfigError, match=message):
        core.setup_models(core.setup_extras_pre())


def test_preserve_base_teaches_plain_captions_the_frozen_models_own_prediction(assets, tmp_path):
    """With preserve_base, a caption without the token learns what the file's Stage C predicts (an independent
    copy here), one with it keeps the data's target; the adapters' scales are back afterwards."""
    from core.weights import load_model
    core = LoraCore(config_file_path=TINY_LORA, overrides=overrides(assets, tmp_path, preserve_base=True,
                                                                     preserve_base_weight=16))
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    torch.manual_seed(1)
    with torch.no_grad():  # an adapter that changes every output
        for name, p in models.lora.named_parameters():
            p.normal_(0, 0.3)
    batch = {"captions": [f"a photo of {TOKEN}", "a photo of a dog", f"{TOKEN} at dusk", ""],
             "images": torch.rand(4, 3, 64, 64)}
    conditions = core.get_conditions(batch, models, extras, is_eval=True)
    noised = torch.randn(4, 16, 8, 8)
    noise_cond = extras.gdf.noise_cond(torch.linspace(-3, 3, 4))
    target = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        before = models.generator(noised, noise_cond, **conditions)
        out, weight = core.training_target(batch, models, noised, noise_cond, conditions, target)
        after = models.generator(noised, noise_cond, **conditions)
        frozen = load_model(assets["stage_c"]).eval()
        plain = [1, 3]
        expected = frozen(noised[plain], noise_cond[plain], **{k: v[plain] for k, v in conditions.items()})
    assert torch.equal(out[[0, 2]], target[[0, 2]])
    assert weight.tolist() == [1, 16, 1, 16]
    torch.testing.assert_close(out[plain], expected)
    assert not torch.allclose(before[plain], expected, atol=1e-3)  # the LoRA is on, and differs from the base
    assert torch.equal(before, after)  # scales restored
    unchanged = LoraCore(config_file_path=TINY_LORA, overrides=overrides(assets, tmp_path))
    same, no_weight = unchanged.training_target(batch, models, noised, noise_cond, conditions, target)
    assert same is target and no_weight is None


def test_token_gated_training_learns_only_from_captions_with_the_token(assets, tmp_path):
    """A token-gated LoRA learns from the rows it will act on (the caption holds a train token) and nothing from the
    others; it cannot be combined with preserve_base, and its file says it is token-gated."""
    from core.weights import read_metadata
    with pytest.raises(ConfigError, match="token_gated and preserve_base exclude each other"):
        LoraCore(config_file_path=TINY_LORA, overrides=overrides(assets, tmp_path, token_gated=True,
                                                                 preserve_base=True))
    core = LoraCore(config_file_path=TINY_LORA, overrides=overrides(assets, tmp_path, token_gated=True, updates=2,
                                                                    save_every=2))
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    batch = {"captions": [f"a photo of {TOKEN}", "a photo of a dog", f"{TOKEN} at dusk", "", "[sks ] apart"]}
    target = torch.randn(5, 16, 8, 8)
    out, weight = core.training_target(batch, models, None, None, None, target)
    assert out is target and weight.tolist() == [1, 0, 1, 0, 0]
    core()
    meta = read_metadata(str(tmp_path / "ck" / core.config.experiment_id / "step_00000002" / "lora.safetensors"))
    assert meta["token_gated"] == "true"
