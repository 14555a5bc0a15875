"""LoRA files at inference: the released layout and order, the closed form, scale, merge/unmerge, several LoRAs,
new tokens, the pipeline and CLI, and the errors for LoRAs that do not fit."""
import copy
import json
import os
import re

import pytest
import torch
from conftest import REFERENCE
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from core.conditioning import build_tokenizer, random_text_encoder, tiny_text_config
from core.weights import load_state_dict_file, read_metadata, save_state_dict_file
from inference.lora import LoraError, add_tokens, apply_lora_file, lora_metadata, lora_targets
from modules.lora import ReToken, apply_lora, apply_retoken
from modules.stage_c import StageC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "inference", "tiny.yaml")
with open(os.path.join(REFERENCE, "checkpoint-layouts", "lora_c_3.6b_rank4.json")) as f:
    LAYOUT = json.load(f)
TOKENS = [["[fernando]", "^dog</w>"], ["[snail]", "^snail"]]  # two new tokens, as in the released layout
NEW_IDS = [49408, 49409]  # the ids upstream gives them on CLIP's 49,408-token vocabulary
TEXT_DIM = 32  # tiny_text_config's width


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is several times faster than two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def narrow_stage_c(width=16):
    """Stage C with the 3.6B's blocks (64 AttnBlocks, so 128 adapters) at a width a CPU runs in a moment."""
    model = StageC(c_in=4, c_out=4, c_r=8, c_cond=width, c_hidden=[width, width], nhead=[2, 2], c_clip_seq=2,
                   c_clip_text=TEXT_DIM, c_clip_text_pooled=8, c_clip_img=8, dropout=[0, 0]).eval()
    with torch.no_grad():  # StageC zero-inits its output layers: random weights everywhere, so everything matters
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
    return model


def stage_c_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(batch, 4, 4, 4, generator=g), r=torch.rand(batch, generator=g),
                clip_text=torch.randn(batch, 77, TEXT_DIM, generator=g),
                clip_text_pooled=torch.randn(batch, 1, 8, generator=g), clip_img=torch.randn(batch, 1, 8, generator=g))


def text_encoder():
    return build_tokenizer(), random_text_encoder(tiny_text_config(hidden=TEXT_DIM))


def attn_weights(model):
    """The released order, spelled out independently: per AttnBlock in module order, out_proj then in-projection."""
    return [w for m in model.modules() if isinstance(m, nn.MultiheadAttention)
            for w in (m.out_proj.weight, m.in_proj_weight)]


def write_lora(path, model, ids=NEW_IDS, text_dim=TEXT_DIM, rank=4, seed=0, metadata=None):
    """A LoRA file for `model` in the released layout (embeddings, then adapters in the released order), random."""
    g = torch.Generator().manual_seed(seed)
    state = {"embeddings.embeddings": torch.randn(len(ids), text_dim, generator=g) * 0.5,
             "embeddings.indices": torch.tensor(ids, dtype=torch.long)}
    for i, w in enumerate(attn_weights(model)):
        state[f"weights.{i}.lora_down"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
        state[f"weights.{i}.lora_up"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
    save_state_dict_file(state, path, metadata=metadata)
    return state


def closed_form(model, state, scale, rank=4, alpha=1.0):
    """W + scale · (alpha/rank) · up @ down, applied by hand to every adapted weight."""
    with torch.no_grad():
        for i, w in enumerate(attn_weights(model)):
            w += scale * alpha / rank * state[f"weights.{i}.lora_up"] @ state[f"weights.{i}.lora_down"]
    return model


def parametrized(*models):
    return any(parametrize.is_parametrized(m) for model in models for m in model.modules())


# ---------------------------------------------------------------------------------------------- released layout
def test_targets_are_apply_loras_order_and_the_released_layout():
    with torch.device("meta"):
        model = StageC()
    targets = lora_targets(model, [".attn"])
    layout = LAYOUT["state_dict"]
    assert [list(t[1].get_parameter(t[2]).shape) for t in targets] == [
        [layout[f"weights.{i}.lora_up"][0], layout[f"weights.{i}.lora_down"][1]] for i in range(128)]
    for stacked in range(2):  # a second LoRA on top keeps the order
        loras = apply_lora(model, filters=[".attn"], rank=4)
        assert lora_targets(model, [".attn"]) == targets
        assert all(lora is module.parametrizations[name][stacked] for lora, (_, module, name) in zip(loras, targets))


def test_released_file_fits_the_3_6b_stage_c_and_not_the_1b(tmp_path):
    path = tmp_path / "released.safetensors"
    state = {k: torch.tensor(NEW_IDS) if k == "embeddings.indices" else torch.randn(shape)
             for k, shape in LAYOUT["state_dict"].items()}
    save_state_dict_file(state, path)  # in the JSON's key order, as released
    with torch.device("meta"):  # the real sizes, no memory
        stage_c, stage_c_1b = StageC(), StageC(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24],
                                               blocks=[[4, 12], [12, 4]])
        text = random_text_encoder(tiny_text_config(hidden=1280, projection=1280, layers=1, heads=20))
    tokenizer = build_tokenizer()
    with pytest.raises(LoraError, match=r"128 adapters but Stage C has 64 weights matching module_filters \['.attn'\]"):
        apply_lora_file(stage_c_1b, text, tokenizer, path, train_tokens=TOKENS)
    lora = apply_lora_file(stage_c, text, tokenizer, path, train_tokens=TOKENS)
    assert lora.tokens == ["[fernando]", "[snail]"] and lora.rank == 4
    assert len(tokenizer) == text.config.vocab_size == text.get_input_embeddings().num_embeddings == 49410
    retoken = text.get_input_embeddings().parametrizations.weight[0]
    assert isinstance(retoken, ReToken) and retoken.indices.shape == (2,)  # (meta: no values to compare)
    assert tokenizer.convert_tokens_to_ids(lora.tokens) == NEW_IDS
    adapters = [m.parametrizations[n][0] for _, m, n in lora_targets(stage_c)]
    assert [list(a.lora_up.shape) for a in adapters] == [LAYOUT["state_dict"][f"weights.{i}.lora_up"]
                                                         for i in range(128)]
    assert all(a.scale == 1 / 4 for a in adapters)


def test_released_layout_equals_the_closed_form_and_merges_and_unmerges(tmp_path):
    model = narrow_stage_c()
    base, oracle = copy.deepcopy(model), copy.deepcopy(model)
    path = tmp_path / "lora.safetensors"
    state = write_lora(path, model)
    assert list(state) == list(LAYOUT["state_dict"])  # the released keys in the released order
    assert all(list(state[k].shape) == [s * 16 // 2048 if s in (2048, 6144) else s for s in shape]
               for k, shape in LAYOUT["state_dict"].items() if k.startswith("weights."))
    tokenizer, text = text_encoder()
    lora = apply_lora_file(model, text, tokenizer, path, scale=0.7, train_tokens=TOKENS)
    closed_form(oracle, state, scale=0.7)
    x = stage_c_inputs()
    with torch.no_grad():
        expected, base_out = oracle(**x), base(**x)
        assert (expected - base_out).abs().max() > 0.05 * base_out.abs().max()  # the adapters matter
        unmerged = model(**x)
        torch.testing.assert_close(unmerged, expected)
        lora.scale = 0.0
        assert torch.equal(model(**x), base_out)  # scale 0 is the base model, exactly
        lora.scale = 0.7
        lora.merge()
        assert lora.merged and not parametrized(model)
        torch.testing.assert_close(model(**x), unmerged, rtol=1e-6, atol=1e-6)
        lora.scale = 0.3  # while merged: unmerges, rescales, merges again
        torch.testing.assert_close(model(**x), closed_form(copy.deepcopy(base), state, 0.3)(**x))
        lora.unmerge()
        assert parametrized(model)
        lora.remove()
        assert not parametrized(model, text)
        now = model.state_dict()
        for k, v in base.state_dict().items():  # the base again, up to fp32 round-off
            torch.testing.assert_close(now[k], v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(**x), base_out, rtol=1e-5, atol=1e-6)


def test_removing_an_unmerged_lora_restores_the_base_exactly(tmp_path):
    model = narrow_stage_c()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    write_lora(tmp_path / "l.safetensors", model)
    tokenizer, text = text_encoder()
    table = text.get_input_embeddings().weight.detach().clone()
    apply_lora_file(model, text, tokenizer, tmp_path / "l.safetensors", train_tokens=TOKENS).remove()
    assert not parametrized(model, text)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
    assert torch.equal(text.get_input_embeddings().weight[:49408], table)  # new rows stay, at their initial values


# ------------------------------------------------------------------------------------------------------ tokens
def test_new_token_is_one_id_and_its_row_is_the_base_row_plus_the_trained_delta(tmp_path):
    model = narrow_stage_c()
    state = write_lora(tmp_path / "l.safetensors", model)
    tokenizer, text = text_encoder()
    table = text.get_input_embeddings().weight.detach().clone()
    lora = apply_lora_file(model, text, tokenizer, tmp_path / "l.safetensors", train_tokens=TOKENS)
    ids = tokenizer("a photo of [fernando] and a [snail]", add_special_tokens=False)["input_ids"]
    assert ids.count(49408) == 1 and ids.count(49409) == 1 and len(ids) == 7
    vocab = tokenizer.get_vocab()
    for row, (token, regex) in enumerate(TOKENS):
        matches = [i for t, i in vocab.items() if i < 49408 and re.search(regex, t)]
        assert matches  # e.g. dog</w>; snail, snails, ...
        expected = table[matches].mean(0) + state["embeddings.embeddings"][row]
        with torch.no_grad():
            torch.testing.assert_close(text.get_input_embeddings()(torch.tensor([NEW_IDS[row]]))[0], expected)
    lora.merge()  # merged: the same rows, now stored in the table
    assert not parametrized(text)
    torch.testing.assert_close(text.get_input_embeddings().weight[NEW_IDS[0]],
                               table[[vocab["dog</w>"]]].mean(0) + state["embeddings.embeddings"][0])


def test_several_loras_with_separate_scales_and_token_ids_shifted_by_earlier_ones(tmp_path):
    model = narrow_stage_c()
    base = copy.deepcopy(model)
    first = write_lora(tmp_path / "a.safetensors", model, seed=1)
    second = write_lora(tmp_path / "b.safetensors", model, ids=[49408], seed=2)  # its token had id 49408 too
    tokenizer, text = text_encoder()
    registry = []
    a = apply_lora_file(model, text, tokenizer, tmp_path / "a.safetensors", scale=0.5, train_tokens=TOKENS,
                        registry=registry)
    b = apply_lora_file(model, text, tokenizer, tmp_path / "b.safetensors", scale=-1.0,
                        train_tokens=[["<zeroed>", None]], registry=registry)
    assert registry == [a, b] and b.tokens == ["<zeroed>"]
    assert tokenizer.convert_tokens_to_ids("<zeroed>") == 49410  # after a's two tokens
    with torch.no_grad():
        torch.testing.assert_close(text.get_input_embeddings().weight[49410], second["embeddings.embeddings"][0])
    x = stage_c_inputs()
    with torch.no_grad():
        both = closed_form(closed_form(copy.deepcopy(base), first, 0.5), second, -1.0)(**x)
        torch.testing.assert_close(model(**x), both)
        a.merge()  # one merged under another still attached
        torch.testing.assert_close(model(**x), both, rtol=1e-5, atol=1e-6)
        a.remove()
        assert registry == [b]
        torch.testing.assert_close(model(**x), closed_form(copy.deepcopy(base), second, -1.0)(**x),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraError, match=r"\['<zeroed>'\] belong to another loaded LoRA"):
        apply_lora_file(model, text, tokenizer, tmp_path / "b.safetensors", train_tokens=[["<zeroed>", None]],
                        registry=registry)
    b.remove()  # then its token may be loaded again: same id, row reset to its initial value
    again = apply_lora_file(model, text, tokenizer, tmp_path / "b.safetensors", train_tokens=[["<zeroed>", None]],
                            registry=registry)
    assert len(tokenizer) == 49411 and again.tokens == ["<zeroed>"]


def test_own_files_carry_their_tokens_and_reload_to_the_same_model(tmp_path):
    model = narrow_stage_c()
    fresh = copy.deepcopy(model)
    tokenizer, text = text_encoder()
    tokenizer2, text2 = copy.deepcopy(tokenizer), copy.deepcopy(text)
    ids = sorted(set(add_tokens(tokenizer, text, TOKENS).values()))
    retoken = apply_retoken(text.get_input_embeddings(), ids)
    loras = apply_lora(model, filters=[".attn"], rank=2, alpha=3)
    with torch.no_grad():
        for p in (*retoken.parameters(), *(p for m in loras for p in m.parameters())):
            p.normal_(0, 0.3)
    lora = nn.ModuleDict({"embeddings": retoken, "weights": nn.ModuleList(loras)})
    save_state_dict_file(lora.state_dict(), tmp_path / "own.safetensors",
                         metadata=lora_metadata(TOKENS, [".attn"], rank=2, alpha=3))
    meta = read_metadata(tmp_path / "own.safetensors")
    assert json.loads(meta["train_tokens"]) == TOKENS and json.loads(meta["rank"]) == 2

    lora = apply_lora_file(fresh, text2, tokenizer2, tmp_path / "own.safetensors")  # no train_tokens needed
    assert lora.tokens == ["[fernando]", "[snail]"] and lora.alpha == 3
    x = stage_c_inputs()
    prompt = tokenizer("a [snail] and [fernando]", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x), model(**x))
        torch.testing.assert_close(text2(**prompt).text_embeds, text(**prompt).text_embeds)
    with pytest.raises(LoraError, match="metadata says train_tokens"):
        apply_lora_file(copy.deepcopy(fresh), text2, tokenizer2, tmp_path / "own.safetensors",
                        train_tokens=[["[other]", None]])


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case,pattern", [
    ("module count", r"128 adapters but Stage C has 8 weights matching module_filters \['.attn'\]"),
    ("base size", r"weights\.0 \(lora_up \[16, 4\], lora_down \[4, 16\]\) does not fit "
                  r"down_blocks\.0\.\d\.attention\.attn\.out_proj\.weight \(24×24\): a LoRA for another Stage C size"),
    ("rank", r"the LoRA has rank 4 but rank 8 is expected \(config or metadata\)"),
    ("no tokens", r"trains token ids \[49408, 49409\] but does not name its tokens"),
    ("other tokens", r"trains token ids \[49408, 49409\] but train_tokens .* give ids \[49408\]"),
    ("text width", "token deltas are 32 wide but the text encoder's embeddings 48"),
])
def test_a_lora_that_does_not_fit_is_a_clear_error_and_changes_nothing(tmp_path, case, pattern):
    from modules.presets import build_model
    path = tmp_path / "l.safetensors"
    write_lora(path, narrow_stage_c())
    model = {"module count": build_model("stage_c", "tiny"),
             "base size": narrow_stage_c(width=24)}.get(case, narrow_stage_c())
    tokenizer, text = build_tokenizer(), random_text_encoder(tiny_text_config(hidden=48 if case == "text width"
                                                                              else TEXT_DIM))
    kwargs = {"rank": {"rank": 8}, "no tokens": {}, "other tokens": {"train_tokens": TOKENS[:1]}}.get(
        case, {"train_tokens": TOKENS})
    with pytest.raises(LoraError, match=pattern):
        apply_lora_file(model, text, tokenizer, path, **kwargs)
    assert len(tokenizer) == 49408 and text.config.vocab_size == 49408 and not parametrized(model, text)


def test_token_rules():
    tokenizer, text = text_encoder()
    with pytest.raises(LoraError, match="'\\[Fernando\\]' would never match: .* lowercases"):
        add_tokens(tokenizer, text, [["[Fernando]", None]])
    assert len(tokenizer) == 49408
    with pytest.raises(LoraError, match="list of \\[token, init_regex\\] pairs"):
        add_tokens(tokenizer, text, ["[fernando]"])
    with pytest.raises(LoraError, match="matches no vocabulary token"):
        add_tokens(tokenizer, text, [["^qqqqzzzz", None]])
    with pytest.warns(UserWarning, match="matches no vocabulary token: its row starts at zeros"):
        mapping = add_tokens(tokenizer, text, [["[new]", "^qqqqzzzz"], ["^snail", None]])
    snail = tokenizer.convert_tokens_to_ids("snail</w>")
    assert mapping[snail] == snail and len(mapping) > 2  # snail</w>, snails</w>, ... re-learnt in place
    assert not text.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("[new]")].any()


# ---------------------------------------------------------------------------------------------- pipeline and CLI
@pytest.fixture(scope="module")
def pipe():
    from inference.loading import load_pipeline
    return load_pipeline(TINY, device="cpu")


@pytest.fixture
def clean(pipe):
    yield pipe
    for lora in list(pipe.loras):
        lora.remove()
    assert not parametrized(pipe.stage_c, pipe.text_model)


def tiny_lora(path, pipe, metadata=True):
    text_dim = pipe.text_model.get_input_embeddings().embedding_dim
    meta = {"train_tokens": json.dumps([["[sks]", "^dog</w>"]]), "rank": "4"} if metadata else None
    return write_lora(path, pipe.stage_c, ids=[49408], text_dim=text_dim, metadata=meta, seed=3)


def small_run(pipe, prompt="a red square", seed=5):
    from inference.pipeline import StageSampling
    return pipe.generate(prompt, seed=seed, height=128, width=128, stage_c=StageSampling(steps=2),
                         stage_b=StageSampling(steps=1, cfg=1.1, shift=1.0))


def test_pipeline_scale_zero_merge_and_settings(clean, tmp_path):
    pipe = clean
    tiny_lora(tmp_path / "l.safetensors", pipe)
    base = small_run(pipe)
    lora = pipe.load_lora(tmp_path / "l.safetensors", scale=0.0)
    assert pipe.loras == [lora] and lora.tokens == ["[sks]"]
    assert torch.equal(small_run(pipe).latents_c, base.latents_c)  # scale 0 and a prompt without the new token
    lora.scale = 1.5
    unmerged = small_run(pipe)
    assert (unmerged.latents_c - base.latents_c).abs().max() > 1e-3
    assert unmerged.settings["loras"] == [{"path": str(tmp_path / "l.safetensors"), "scale": 1.5, "merged": False,
                                           "tokens": ["[sks]"]}]
    lora.merge()
    torch.testing.assert_close(small_run(pipe).latents_c, unmerged.latents_c, rtol=1e-4, atol=1e-5)
    with_token = small_run(pipe, prompt="a [sks] square")
    assert (with_token.latents_c - unmerged.latents_c).abs().max() > 1e-4


def test_released_file_through_a_lora_config(clean, tmp_path):
    pipe = clean
    tiny_lora(tmp_path / "released.safetensors", pipe, metadata=False)
    with pytest.raises(LoraError, match="does not name its tokens .* configs/inference/lora_c_3b.yaml"):
        pipe.load_lora(tmp_path / "released.safetensors")
    config = tmp_path / "lora.yaml"
    config.write_text("model_version: tiny\nmodule_filters: ['.attn']\nrank: 4\n"
                      "train_tokens:\n  - ['[sks]', '^dog</w>']\nlora_checkpoint_path: released.safetensors\n")
    lora = pipe.load_lora(config)  # the file's path is relative to the config when not to the working directory
    assert lora.tokens == ["[sks]"] and lora.path == str(tmp_path / "released.safetensors")
    config.write_text("lora_checkpoint_path: released.safetensors\nlora_rank: 4\n")
    with pytest.raises(LoraError, match=r"unknown key\(s\) \['lora_rank'\]"):
        pipe.load_lora(config)


def test_cli_flags(clean, tmp_path):
    from inference.generate import build_parser, main
    parser = build_parser()
    args = parser.parse_args(["--lora", "a.safetensors", "--lora-scale", "0.5", "--lora", "b.yaml"])
    assert args.loras == [("a.safetensors", 0.5), ("b.yaml", 1.0)] and not args.merge_lora
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-scale", "0.5", "--lora", "a.safetensors"])
    tiny_lora(tmp_path / "l.safetensors", clean)
    paths = main(["--config", TINY, "--prompt", "a [sks] dog", "--lora", str(tmp_path / "l.safetensors"),
                  "--lora-scale", "0.8", "--merge-lora", "--steps-c", "2", "--steps-b", "1", "--height", "128",
                  "--width", "128", "--seed", "1", "--out", str(tmp_path / "out"), "--quiet"])
    record = json.loads(Image.open(paths[0]).text["parameters"])
    assert record["loras"] == [{"path": str(tmp_path / "l.safetensors"), "scale": 0.8, "merged": True,
                                "tokens": ["[sks]"]}]


def test_files_with_names_sorted_as_safetensors_writes_them_load_by_index(tmp_path):
    """safetensors' own writer sorts names (weights.10 before weights.2): adapters are matched by index."""
    model = narrow_stage_c()
    state = write_lora(tmp_path / "l.safetensors", model)
    save_state_dict_file(dict(sorted(state.items())), tmp_path / "l.safetensors")
    assert list(load_state_dict_file(tmp_path / "l.safetensors"))[2:4] == ["weights.0.lora_down", "weights.0.lora_up"]
    assert list(load_state_dict_file(tmp_path / "l.safetensors"))[4] == "weights.1.lora_down"
    tokenizer, text = text_encoder()
    apply_lora_file(model, text, tokenizer, tmp_path / "l.safetensors", train_tokens=TOKENS)
    adapters = [m.parametrizations[n][0] for _, m, n in lora_targets(model)]
    assert all(torch.equal(adapters[i].lora_up, state[f"weights.{i}.lora_up"]) for i in range(128))


def test_a_lora_trained_against_another_objective_is_refused(clean, tmp_path):
    """Files written here record the objective of the Stage C they were trained on; the tiny pipeline's Stage C
    predicts epsilon (its file records nothing, like the released ones)."""
    pipe = clean
    text_dim = pipe.text_model.get_input_embeddings().embedding_dim
    for target in ("v", "epsilon"):
        meta = {"train_tokens": json.dumps([["[sks]", "^dog</w>"]]), "rank": "4", "gdf_target": target}
        write_lora(tmp_path / f"{target}.safetensors", pipe.stage_c, ids=[49408], text_dim=text_dim, metadata=meta)
    with pytest.raises(LoraError, match="trained against a Stage C that predicts v, but this Stage C predicts "
                                        "epsilon: retrain the LoRA on this Stage C with gdf_target: epsilon"):
        pipe.load_lora(tmp_path / "v.safetensors")
    assert not pipe.loras and not parametrized(pipe.stage_c, pipe.text_model)
    pipe.load_lora(tmp_path / "epsilon.safetensors")
    assert len(pipe.loras) == 1


# ---------------------------------------------------------------------------------------------- token gating
def test_token_gated_stage_c_runs_each_row_with_or_without_the_lora(tmp_path):
    """Rows flagged for a gated LoRA equal Stage C with it, the others Stage C without it, whatever their order."""
    from inference.lora import TokenGatedStageC
    model = narrow_stage_c()
    tokenizer, text = text_encoder()
    write_lora(tmp_path / "l.safetensors", model, ids=[49408], metadata={
        "train_tokens": json.dumps([["[fernando]", "^dog</w>"]]), "rank": "4", "token_gated": "true"})
    inputs = stage_c_inputs(batch=4)
    x, r = inputs.pop("x"), inputs.pop("r")
    with torch.no_grad():
        without = model(x, r, **inputs)
        lora = apply_lora_file(model, text, tokenizer, tmp_path / "l.safetensors")
        assert lora.token_gated and lora.describe()["token_gated"]
        with_lora = model(x, r, **inputs)
        rows = torch.tensor([[True], [False], [True], [False]])
        gated = TokenGatedStageC(model, [lora])(x, r, lora_rows=rows, **inputs)
        all_off = TokenGatedStageC(model, [lora])(x, r, lora_rows=torch.zeros(4, 1, dtype=torch.bool), **inputs)
    assert (with_lora - without).abs().max() > 1e-3
    torch.testing.assert_close(gated[[0, 2]], with_lora[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated[[1, 3]], without[[1, 3]], rtol=1e-5, atol=1e-6)
    assert torch.equal(all_off, without)  # one pattern: one call, the adapters adding exact zeros
    with pytest.raises(LoraError, match="token-gated .* cannot be merged"):
        lora.merge()
    lora.remove()


def test_token_gated_lora_leaves_prompts_without_its_token_exactly_as_they_were(clean, tmp_path):
    """Through the pipeline: a prompt without the token draws the same latents with the gated LoRA loaded, alone or
    batched with one that holds it; the token's prompt changes, and differently from the ungated LoRA (whose
    unconditional branch also moves). Merging is refused with the reason."""
    pipe = clean
    text_dim = pipe.text_model.get_input_embeddings().embedding_dim
    meta = {"train_tokens": json.dumps([["[sks]", "^dog</w>"]]), "rank": "4"}
    write_lora(tmp_path / "plain.safetensors", pipe.stage_c, ids=[49408], text_dim=text_dim, metadata=meta, seed=3)
    write_lora(tmp_path / "gated.safetensors", pipe.stage_c, ids=[49408], text_dim=text_dim, seed=3,
               metadata={**meta, "token_gated": "true"})
    prompts = ["a red square", "a [sks] square"]
    base = small_run(pipe, prompts[0])
    with pytest.raises(LoraError, match="token-gated .*no --merge-lora"):
        pipe.load_lora(tmp_path / "gated.safetensors", merge=True)
    assert pipe.loras == [] and not parametrized(pipe.stage_c, pipe.text_model)
    pipe.load_lora(tmp_path / "plain.safetensors")
    ungated = small_run(pipe, prompts[1])
    pipe.loras[0].remove()
    lora = pipe.load_lora(tmp_path / "gated.safetensors")
    assert torch.equal(small_run(pipe, prompts[0]).latents_c, base.latents_c)
    token = small_run(pipe, prompts[1])
    both = small_run(pipe, prompts)  # seeds 5 and 6: the second row is the token prompt at seed 6
    torch.testing.assert_close(both.latents_c[:1], base.latents_c, rtol=1e-4, atol=1e-5)
    assert (token.latents_c - ungated.latents_c).abs().max() > 1e-3
    assert both.settings["loras"][0]["token_gated"] is True
