"""LoRA files for Stage C and the text encoder: read, check against the model, apply unmerged or merged, save.

A LoRA file is the state dict of `ModuleDict({"embeddings": ReToken, "weights": [LoRA, ...]})` (SPEC §5): deltas for
some rows of the CLIP token table with their ids, then one adapter per adapted Stage C weight in module order.
Released files hold only the token ids, so the token strings and the regexes that initialised their rows come from
a config's `train_tokens` (upstream's way, configs/inference/lora_c_3b.yaml); files written here also carry them,
with the filters, rank and alpha, in their metadata. Training and inference register tokens with the same
`add_tokens`, so a token's row is the same initial row plus the trained delta in both.
"""
import contextlib
import json
import os
import re
import warnings

import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

from core.weights import load_state_dict_file, objective_mismatch, read_metadata
from modules.lora import _ADAPTED_TENSORS, LoRA, ReToken, _adaptable, lora_disabled

DEFAULT_FILTERS = (".attn",)  # upstream's module_filters: every AttnBlock's in- and out-projection
# Keys of upstream's LoRA configs that describe the base model; a LoRA config may carry them, loading ignores them.
_STAGE_KEYS = {"model_version", "dtype", "effnet_checkpoint_path", "previewer_checkpoint_path",
               "generator_checkpoint_path"}
_LORA_KEYS = {"lora_checkpoint_path", "module_filters", "rank", "train_tokens"}
_WEIGHT_KEY = re.compile(r"weights\.(\d+)\.(lora_down|lora_up)")


class LoraError(ValueError):
    """A LoRA that does not fit the model, or whose tokens are unknown; the message names the mismatch."""


# ------------------------------------------------------------------------------------------------------- tokens
def is_new_token(token):
    """Upstream's rule: `[name]` or `<name>` is a new token; any other entry is a regex over the vocabulary."""
    return len(token) > 2 and (token[0], token[-1]) in (("[", "]"), ("<", ">"))


def _check_train_tokens(train_tokens):
    def pair(p):
        return isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and (
            p[1] is None or isinstance(p[1], str))

    if not isinstance(train_tokens, (list, tuple)) or not all(pair(p) for p in train_tokens):
        raise LoraError(f"train_tokens must be a list of [token, init_regex] pairs (init_regex may be null), "
                        f"e.g. [['[fernando]', '^dog</w>']]; got {train_tokens!r}")
    return [[t, r] for t, r in train_tokens]


def _resolve(tokenizer, train_tokens):
    """(id at training, token, init regex, is new) per trained id, as upstream assigns them to the base tokenizer:
    the k-th new token gets vocab_size + k, a regex entry every vocabulary id whose token it matches."""
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size}  # base vocabulary only
    resolved, new = {}, []
    for token, init in _check_train_tokens(train_tokens):
        if is_new_token(token):
            if token in vocab:
                raise LoraError(f"new token {token!r} is already in the CLIP vocabulary; choose another name")
            if tokenizer.backend_tokenizer.normalizer.normalize_str(token) != token:
                raise LoraError(f"new token {token!r} would never match: the tokenizer normalises text first (CLIP "
                                f"lowercases it), so write it in its normalised form")
            if token not in new:
                resolved[tokenizer.vocab_size + len(new)] = (token, init, True)
                new.append(token)
        else:
            ids = [i for t, i in vocab.items() if re.search(token, t)]
            if not ids:
                raise LoraError(f"train_tokens regex {token!r} matches no vocabulary token")
            for i in sorted(ids):
                resolved.setdefault(i, (tokenizer.convert_ids_to_tokens(i), None, False))
    return resolved


def _table(text_model):
    """The token table and the tensor that holds its base rows (under a ReToken: the parametrization's original)."""
    table = text_model.get_input_embeddings()
    return table, _stored(table, "weight")


def _stored(module, name):
    """The tensor a parametrization reads (its `original`), else the plain parameter: where merges go."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


@torch.no_grad()
def add_tokens(tokenizer, text_model, train_tokens):
    """Registers `train_tokens` ([token, init_regex] pairs) with the tokenizer and the text encoder's table.

    A new token gets one id and one more table row (the text model's config grows with it): the mean of the base
    vocabulary rows whose token matches init_regex, zeros for null or no match (upstream warns and does the same).
    A token left behind by an unloaded LoRA is reused and its row reset. Regex entries select existing ids to
    re-learn. Returns {id at training: id now}, different only when other tokens were added since the base tokenizer.
    """
    table, rows = _table(text_model)
    if table.num_embeddings != len(tokenizer):
        raise LoraError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's table "
                        f"{table.num_embeddings} rows; they must grow together")
    mapping = {}
    for train_id, (token, init, new) in _resolve(tokenizer, train_tokens).items():
        if not new:
            mapping[train_id] = train_id
            continue
        tokenizer.add_tokens([token])
        now = tokenizer.convert_tokens_to_ids(token)
        matches = [i for t, i in tokenizer.get_vocab().items()
                   if i < tokenizer.vocab_size and init is not None and re.search(init, t)]
        if init is not None and not matches:
            warnings.warn(f"init regex {init!r} of {token!r} matches no vocabulary token: its row starts at zeros",
                          stacklevel=2)
        row = rows[matches].float().mean(0) if matches else rows.new_zeros(rows.shape[1])
        if now == rows.shape[0]:
            grown = nn.Parameter(torch.cat([rows, row[None].to(rows)]), requires_grad=rows.requires_grad)
            holder = table.parametrizations.weight if parametrize.is_parametrized(table, "weight") else table
            setattr(holder, "original" if holder is not table else "weight", grown)
            table.num_embeddings = text_model.config.vocab_size = grown.shape[0]
            table, rows = _table(text_model)
        else:
            rows[now] = row.to(rows)
        mapping[train_id] = now
    return mapping


# ------------------------------------------------------------------------------------------------- the adapters
def lora_targets(model, filters=DEFAULT_FILTERS):
    """(module path, module, tensor name) of every weight `modules.lora.apply_lora(model, filters)` adapts, in its
    order, the checkpoint order: a module's own tensors come after its submodules', because the `parametrizations`
    container holding their adapters is registered last (hence out_proj before the fused in-projection)."""
    found = []

    def visit(path, module):
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)
        if filters is None or any(f in path for f in filters):
            found.extend((path, module, t) for t in _ADAPTED_TENSORS if _adaptable(module, t))

    visit("", model)
    return found


def _detach(module, name, p):
    """Removes one parametrization of several stacked on a tensor; the last one leaves the base tensor itself."""
    chain = module.parametrizations[name]
    if len(chain) == 1:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    else:
        del chain[next(i for i, q in enumerate(chain) if q is p)]


class LoadedLoRA:
    """One LoRA file on Stage C and the text encoder.

    Unmerged, its adapters are parametrizations (the scale can change between calls); merged, their updates are
    added into the weights (no cost per call). Stage C's update is `scale · (alpha/rank) · up @ down`; token
    deltas are not scaled. `remove()` gives the base weights back and leaves the registry; added tokens stay in the
    tokenizer, at their initial rows.
    """

    def __init__(self, path, targets, adapters, table, retoken, tokens, alpha, rank, registry=None,
                 token_gated=False, token_ids=()):
        self.path, self.tokens, self.alpha, self.rank = path, tokens, alpha, rank
        self._pairs = [(module, name, a) for (_, module, name), a in zip(targets, adapters)]
        if retoken is not None:
            self._pairs.append((table, "weight", retoken))
        self._scale, self.merged, self.attached = 1.0, False, False
        self.registry = registry if registry is not None else []  # the loaded LoRAs of a pipeline, this one among them
        # Stage C uses a token-gated LoRA only for the rows whose text holds one of its tokens (`rows`, `disabled`)
        self.token_gated = bool(token_gated)
        self.token_ids = list(token_ids)  # the ids of `tokens`

    @property
    def scale(self):
        return self._scale

    @scale.setter
    def scale(self, value):
        merged = self.merged
        if merged:
            self.unmerge()
        self._scale = float(value)
        for _, _, p in self._pairs:
            if isinstance(p, LoRA):
                p.scale = self._scale * self.alpha / self.rank
        if merged:
            self.merge()

    def attach(self):
        for module, name, p in self._pairs:
            parametrize.register_parametrization(module, name, p)
        self.attached = True

    def rows(self, token_ids):
        """Which rows of tokenised texts (B×L ids) hold one of this LoRA's tokens: where a token-gated LoRA acts."""
        wanted = torch.tensor(self.token_ids, dtype=token_ids.dtype, device=token_ids.device)
        return torch.isin(token_ids, wanted).any(dim=1)

    def disabled(self):
        """A context in which Stage C runs without this LoRA's adapters (`modules.lora.lora_disabled`)."""
        return lora_disabled(p for _, _, p in self._pairs)

    @torch.no_grad()
    def merge(self):
        """Folds the updates into the weights (under any other LoRA still attached)."""
        if self.merged:
            return
        if self.token_gated:
            raise LoraError(f"{self.path} is token-gated (it acts only on prompts holding {self.tokens}), so it "
                            "cannot be merged into weights every prompt shares: load it unmerged")
        self._undo()
        for module, name, p in self._pairs:
            base = _stored(module, name)
            base.add_(p.to(base.device)(torch.zeros_like(base)))
        self.merged = True

    def unmerge(self):
        """Takes the updates out of the weights again (exact up to fp32 round-off) and re-attaches the adapters."""
        if self.merged:
            self._undo()
            self.attach()

    def remove(self):
        self._undo()
        if self in self.registry:
            self.registry.remove(self)

    @torch.no_grad()
    def _undo(self):
        if self.merged:
            for module, name, p in self._pairs:
                base = _stored(module, name)
                base.sub_(p.to(base.device)(torch.zeros_like(base)))
            self.merged = False
        elif self.attached:
            for module, name, p in self._pairs:
                _detach(module, name, p)
            self.attached = False

    def describe(self):
        out = {"path": self.path, "scale": self.scale, "merged": self.merged, "tokens": self.tokens}
        return {**out, "token_gated": True} if self.token_gated else out


# ---------------------------------------------------------------------------------------------------- the files
def read_lora_config(path):
    """A LoRA YAML with upstream's keys (lora_checkpoint_path, module_filters, rank, train_tokens); the base model's
    keys it may also carry are ignored, others are errors that name the key."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise LoraError(f"{path}: expected a mapping of keys to values")
    unknown = sorted(set(values) - _LORA_KEYS - _STAGE_KEYS)
    if unknown:
        raise LoraError(f"{path}: unknown key(s) {unknown}; a LoRA config has {sorted(_LORA_KEYS)}")
    if not values.get("lora_checkpoint_path"):
        raise LoraError(f"{path}: lora_checkpoint_path is not set")
    file = values["lora_checkpoint_path"]  # relative to the working directory (upstream's), else to the config
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), file)
    file = beside if not os.path.exists(file) and os.path.exists(beside) else file
    return dict(path=file, module_filters=values.get("module_filters"), rank=values.get("rank"),
                train_tokens=values.get("train_tokens"))


def _split(state, path):
    """The file's adapters as [(down, up)] by index, and its token ids and deltas (empty when it has none)."""
    adapters, unknown = {}, []
    for key, t in state.items():
        m = _WEIGHT_KEY.fullmatch(key)
        if m:
            adapters.setdefault(int(m[1]), {})[m[2]] = t
        elif key not in ("embeddings.embeddings", "embeddings.indices"):
            unknown.append(key)
    if unknown:
        raise LoraError(f"{path}: not a LoRA file in the released layout: unexpected key(s) {unknown[:5]}")
    broken = [i for i in range(len(adapters)) if len(adapters.get(i, {})) != 2]
    if broken:
        raise LoraError(f"{path}: adapter {broken[0]} lacks lora_down or lora_up (or the numbering has a gap)")
    if ("embeddings.indices" in state) != ("embeddings.embeddings" in state):
        raise LoraError(f"{path}: has only one of embeddings.indices and embeddings.embeddings")
    indices = state["embeddings.indices"].tolist() if "embeddings.indices" in state else []
    deltas = state.get("embeddings.embeddings")
    return [(adapters[i]["lora_down"], adapters[i]["lora_up"]) for i in range(len(adapters))], indices, deltas


def _check_fit(pairs, targets, filters, rank, path):
    if len(pairs) != len(targets):
        raise LoraError(f"{path}: the LoRA has {len(pairs)} adapters but Stage C has {len(targets)} weights matching "
                        f"module_filters {list(filters)}: it was made for another model or other filters")
    ranks = sorted({down.shape[0] for down, _ in pairs})
    if len(ranks) > 1:
        raise LoraError(f"{path}: adapters of different ranks {ranks}")
    if rank is not None and ranks and ranks[0] != int(rank):
        raise LoraError(f"{path}: the LoRA has rank {ranks[0]} but rank {rank} is expected (config or metadata)")
    for i, ((down, up), (module_path, module, name)) in enumerate(zip(pairs, targets)):
        out, inp = _stored(module, name).shape[:2]
        if down.shape[1] != inp or up.shape[0] != out or up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: weights.{i} (lora_up {list(up.shape)}, lora_down {list(down.shape)}) does not "
                            f"fit {module_path}.{name} ({out}×{inp}): a LoRA for another Stage C size")
    return ranks[0] if ranks else int(rank or 1)


def apply_lora_file(stage_c, text_model, tokenizer, path, scale=1.0, merge=False, train_tokens=None,
                    module_filters=None, rank=None, registry=None):
    """Checks a LoRA file against the models, then registers its tokens and applies it (see `LoadedLoRA`).

    train_tokens, module_filters and rank come from the file's metadata; for released files, which have none, from
    the arguments (a config's values), filters defaulting to upstream's ['.attn']. Given both, they must agree.
    Nothing changes when a check fails. `registry`: the LoRAs already loaded on these models (a pipeline's
    `loras`), whose new tokens this one may not reuse; the new handle joins it.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    recorded = {k: json.loads(meta[k]) for k in ("train_tokens", "module_filters", "rank", "alpha", "token_gated")
                if k in meta}
    for key, given in (("train_tokens", train_tokens), ("module_filters", module_filters), ("rank", rank)):
        if given is not None and key in recorded and json.loads(json.dumps(given)) != recorded[key]:
            raise LoraError(f"{path}: its metadata says {key}={recorded[key]!r} but {given!r} was given")
    mismatch = objective_mismatch(path, getattr(stage_c, "gdf_target", "epsilon"), "the LoRA")
    if mismatch:
        raise LoraError(mismatch)
    train_tokens = recorded.get("train_tokens", train_tokens)
    filters = recorded.get("module_filters", module_filters or list(DEFAULT_FILTERS))
    pairs, indices, deltas = _split(load_state_dict_file(path), path)
    targets = lora_targets(stage_c, filters)
    rank = _check_fit(pairs, targets, filters, recorded.get("rank", rank), path)
    alpha = recorded.get("alpha", 1.0)
    token_gated = bool(recorded.get("token_gated", False))
    if token_gated and not indices:
        raise LoraError(f"{path} is token-gated but trains no token: nothing could switch it on")
    if token_gated and merge:
        raise LoraError(f"{path} is token-gated (it acts only on prompts holding its tokens), so it cannot be "
                        "merged into weights every prompt shares: load it without merging (no --merge-lora)")

    table, rows = _table(text_model)
    if indices:
        if train_tokens is None:
            raise LoraError(f"{path} trains token ids {indices} but does not name its tokens (released files do not): "
                            "give the config's train_tokens, e.g. --lora with a LoRA config like "
                            "configs/inference/lora_c_3b.yaml")
        expected = _resolve(tokenizer, train_tokens)
        if sorted(expected) != sorted(indices):
            raise LoraError(f"{path} trains token ids {sorted(indices)} but train_tokens {train_tokens} give ids "
                            f"{sorted(expected)}")
        taken = {t for lora in registry or [] for t in lora.tokens}
        clash = [t for t, _, new in expected.values() if new and t in taken]
        if clash:
            raise LoraError(f"{path}: token(s) {clash} belong to another loaded LoRA; remove it first")
        if deltas.shape[1] != rows.shape[1]:
            raise LoraError(f"{path}: its token deltas are {deltas.shape[1]} wide but the text encoder's embeddings "
                            f"{rows.shape[1]}: a LoRA for another text encoder")

    retoken, tokens, ids = None, [], []
    if indices:
        mapping = add_tokens(tokenizer, text_model, train_tokens)
        table, rows = _table(text_model)
        ids = [mapping[i] for i in indices]
        retoken = ReToken(ids, dim=rows.shape[1]).to(device=rows.device, dtype=rows.dtype).requires_grad_(False)
        with torch.no_grad():
            retoken.embeddings.copy_(deltas)
        tokens = tokenizer.convert_ids_to_tokens(ids)
    adapters = []
    for (down, up), (_, module, name) in zip(pairs, targets):
        lora = LoRA(module, name, rank=rank, alpha=alpha).requires_grad_(False)
        with torch.no_grad():
            lora.lora_down.copy_(down), lora.lora_up.copy_(up)
        adapters.append(lora)
    loaded = LoadedLoRA(path, targets, adapters, table, retoken, tokens, alpha, rank, registry, token_gated, ids)
    loaded.scale = scale
    loaded.attach()
    if merge:
        loaded.merge()
    loaded.registry.append(loaded)
    return loaded


def load_lora(pipe, source, scale=1.0, merge=False, train_tokens=None, module_filters=None, rank=None):
    """Applies a LoRA file, or a LoRA config naming one (upstream's keys), to a pipeline; kept in `pipe.loras`."""
    source = os.fspath(source)
    if source.endswith((".yaml", ".yml")):
        cfg = read_lora_config(source)
        source = cfg.pop("path")
        train_tokens = train_tokens if train_tokens is not None else cfg["train_tokens"]
        module_filters = module_filters if module_filters is not None else cfg["module_filters"]
        rank = rank if rank is not None else cfg["rank"]
    return apply_lora_file(pipe.stage_c, pipe.text_model, pipe.tokenizer, source, scale=scale, merge=merge,
                           train_tokens=train_tokens, module_filters=module_filters, rank=rank, registry=pipe.loras)


def lora_metadata(train_tokens, module_filters, rank, alpha=1.0, token_gated=False):
    """The safetensors metadata of a LoRA file written here: what loading needs to rebuild its tokens and check
    its fit, which released files lack; and whether it is token-gated (see `token_gated_rows`)."""
    meta = {"train_tokens": json.dumps(train_tokens), "module_filters": json.dumps(list(module_filters)),
            "rank": json.dumps(int(rank)), "alpha": json.dumps(float(alpha))}
    return {**meta, "token_gated": "true"} if token_gated else meta


# --------------------------------------------------------------------------------------------- token gating
def text_token_ids(tokenizer, texts):
    """B×L token ids of `texts` as the text encoder reads them (padded, truncated to its length): what decides
    whether a token-gated LoRA acts on a row, in training and at inference alike."""
    from core.conditioning import MAX_TOKENS
    return tokenizer(list(texts), truncation=True, padding="max_length", return_tensors="pt",
                     max_length=min(tokenizer.model_max_length, MAX_TOKENS)).input_ids


def token_gated_rows(loras, token_ids):
    """For the token-gated LoRAs among `loras`: B×n bools, row i column j true when text i (tokenised, B×L ids)
    holds a token of the j-th, i.e. when Stage C should use it for that row; None when none is token-gated."""
    gated = [lora for lora in loras if lora.token_gated]
    if not gated:
        return None
    return torch.stack([lora.rows(token_ids) for lora in gated], dim=1)


class TokenGatedStageC:
    """Stage C for a batch under token-gated LoRAs: the rows that share a pattern of `lora_rows` (the model input
    `token_gated_rows` makes) run together, each gated LoRA switched off where its column is false.

    So a prompt without a LoRA's token, and every unconditional row, gets Stage C's own prediction: the LoRA
    cannot change what those prompts draw, and guidance pushes from the base model's unconditional prediction.
    """

    def __init__(self, model, loras):
        self.model, self.gated = model, [lora for lora in loras if lora.token_gated]

    def __call__(self, x, r, lora_rows=None, **inputs):
        if lora_rows is None:
            return self.model(x, r, **inputs)
        patterns = torch.unique(lora_rows, dim=0)
        if len(patterns) == 1:
            with self._only(patterns[0]):
                return self.model(x, r, **inputs)
        out = None
        for pattern in patterns:
            index = (lora_rows == pattern).all(dim=1).nonzero().squeeze(1)
            with self._only(pattern):
                part = self.model(x[index], r[index], **_select_rows(inputs, index, x.size(0)))
            if out is None:
                out = part.new_empty((x.size(0), *part.shape[1:]))
            out[index] = part
        return out

    @contextlib.contextmanager
    def _only(self, pattern):
        with contextlib.ExitStack() as stack:
            for lora, on in zip(self.gated, pattern.tolist()):
                if not on:
                    stack.enter_context(lora.disabled())
            yield


def _select_rows(value, index, batch):
    """`value` (a model input: tensor, list, tuple, dict or other) with its batch rows narrowed to `index`."""
    if torch.is_tensor(value):
        return value[index] if value.dim() and value.size(0) == batch else value
    if isinstance(value, dict):
        return {k: _select_rows(v, index, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select_rows(v, index, batch) for v in value)
    return value
