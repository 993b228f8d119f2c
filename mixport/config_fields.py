"""The type and range of every model config field mixport reads, declared once and checked in one place.

Two readers check against ``FIELDS``: a family's adapter (``models.adapter``) for a Hugging Face
config.json, naming config.json's keys, and ``artifact.validate_folder`` for the ``config`` an
export's manifest.json records (the runtimes size their buffers from it), naming ``config.<field>``.
``models.config.MoEConfig`` holds exactly these fields. Sizes are capped well above any real model,
so a hostile value cannot ask for an absurd allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from mixport.typed_json import shown

MAX_VOCAB = 2**24  # the largest hub vocabularies are ~2**18
MAX_HIDDEN = 2**18
MAX_INTERMEDIATE = 2**20
MAX_LAYERS = 2**12
MAX_HEADS = 2**12
MAX_EXPERTS = 2**16
MAX_HEAD_DIM = 2**14
MAX_CONTEXT = 2**24  # max_position_embeddings, sliding_window (hub models reach ~2**23)
MAX_FLOAT = 1e30


@dataclass(frozen=True)
class Field:
    """One field: ``kind`` int | float | bool | str | id (a token id) | ids (a token id or a list of them);
    ints within [low, high]; floats finite, > 0 and <= high; ``choices`` for a str."""

    kind: str
    low: int = 1
    high: float = MAX_FLOAT
    nullable: bool = False
    even: bool = False
    choices: tuple[str, ...] = ()
    zero: bool = False  # a float may be 0

    def expected(self) -> str:
        text = {
            "int": (f"a positive integer (at most {int(self.high)})" if self.low == 1 else
                    f"an {'even ' if self.even else ''}integer in [{self.low}, {int(self.high)}]"),
            "float": f"a finite number {'>=' if self.zero else '>'} 0 and <= {self.high:g}",
            "bool": "true or false",
            "str": " | ".join(self.choices) if self.choices else "a string",
            "id": "a token id (an integer >= 0)",
            "ids": "a token id or a list of token ids (integers >= 0)",
            "layers": f"a list of distinct layer indices (integers in [0, {MAX_LAYERS}))",
            "floats": f"a list of finite numbers > 0 (at most {MAX_HEAD_DIM})",
        }[self.kind]
        return f"{text}, or null" if self.nullable else text

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "layers":
            return isinstance(value, (list, tuple)) and len(value) <= MAX_LAYERS \
                and all(_is_int(v) and 0 <= v < MAX_LAYERS for v in value) and len(set(value)) == len(value)
        if self.kind == "floats":
            return isinstance(value, (list, tuple)) and 0 < len(value) <= MAX_HEAD_DIM and all(
                (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and 0 < v <= self.high for v in value)
        if self.kind == "ids" and isinstance(value, list):
            return all(_is_int(v) and v >= 0 for v in value)
        if self.kind in ("id", "ids"):
            return _is_int(value) and value >= 0  # type: ignore[operator]
        if self.kind == "int":
            return _is_int(value) and self.low <= value <= self.high and not (self.even and value % 2)  # type: ignore[operator]
        if self.kind == "float":
            return (_is_int(value) or isinstance(value, float)) and math.isfinite(value) \
                and (0 < value or (self.zero and value == 0)) and value <= self.high  # type: ignore[operator]
        if self.kind == "bool":
            return isinstance(value, bool)
        return isinstance(value, str) and (not self.choices or value in self.choices)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELDS: dict[str, Field] = {
    "vocab_size": Field("int", high=MAX_VOCAB),
    "hidden_size": Field("int", high=MAX_HIDDEN),
    "intermediate_size": Field("int", high=MAX_INTERMEDIATE),
    "num_hidden_layers": Field("int", high=MAX_LAYERS),
    "num_attention_heads": Field("int", high=MAX_HEADS),
    "num_key_value_heads": Field("int", high=MAX_HEADS),
    "num_local_experts": Field("int", high=MAX_EXPERTS),
    "num_experts_per_tok": Field("int", high=MAX_EXPERTS),
    "head_dim": Field("int", low=2, high=MAX_HEAD_DIM, even=True),  # RoPE rotates pairs
    "rms_norm_eps": Field("float", high=1.0),
    "rope_theta": Field("float"),
    "max_position_embeddings": Field("int", high=MAX_CONTEXT),
    "sliding_window": Field("int", high=MAX_CONTEXT, nullable=True),
    "tie_word_embeddings": Field("bool"),
    "normalization": Field("str", choices=("renormalize", "none")),
    "bos_token_id": Field("id", nullable=True),
    "eos_token_id": Field("ids", nullable=True),
    "pad_token_id": Field("id", nullable=True),
    "model_type": Field("str"),
    "routing_order": Field("str", choices=("softmax_topk", "topk_softmax")),
    "scoring": Field("str", choices=("softmax", "sigmoid", "sparsemixer")),
    "n_group": Field("int", high=MAX_EXPERTS),
    "topk_group": Field("int", high=MAX_EXPERTS),
    "group_score": Field("str", choices=("max", "top2_sum")),
    "routed_scaling_factor": Field("float"),
    "selection_bias": Field("bool"),
    "sparsemixer_eps": Field("float", high=1.0, zero=True),
    "qkv_bias": Field("bool"),
    "o_bias": Field("bool"),
    "qk_norm": Field("str", choices=("none", "head", "projection")),
    "clip_qkv": Field("float", nullable=True),
    "attention_scale": Field("float", nullable=True),
    "sliding_layers": Field("layers", nullable=True),
    "attention_sinks": Field("bool"),
    "kv_lora_rank": Field("int", low=0, high=MAX_HIDDEN),
    "q_lora_rank": Field("int", low=0, high=MAX_HIDDEN),
    "qk_nope_head_dim": Field("int", low=0, high=MAX_HEAD_DIM),
    "v_head_dim": Field("int", low=0, high=MAX_HEAD_DIM),
    "rope_layout": Field("str", choices=("half", "pairs", "pairs_to_half")),
    "shared_expert_intermediate_size": Field("int", low=0, high=MAX_INTERMEDIATE),
    "shared_expert_gate": Field("bool"),
    "dense_layers": Field("layers"),
    "dense_intermediate_size": Field("int", low=0, high=MAX_INTERMEDIATE),
    "router_bias": Field("bool"),
    "expert_bias": Field("bool"),
    "expert_activation": Field("str", choices=("swiglu", "swiglu_clamped")),
    "swiglu_alpha": Field("float", high=1e4),
    "swiglu_limit": Field("float", high=1e6),
    "embedding_multiplier": Field("float"),
    "residual_multiplier": Field("float"),
    "logits_scaling": Field("float"),
    "rope_type": Field("str", choices=("default", "yarn", "longrope")),
    "rope_factor": Field("float", nullable=True),
    "rope_original_max": Field("int", high=MAX_CONTEXT, nullable=True),
    "rope_attention_factor": Field("float", nullable=True),
    "rope_beta_fast": Field("float", nullable=True),
    "rope_beta_slow": Field("float", nullable=True),
    "rope_mscale": Field("float", nullable=True),
    "rope_mscale_all_dim": Field("float", nullable=True),
    "rope_truncate": Field("bool"),
    "rope_short_factor": Field("floats", nullable=True),
    "rope_long_factor": Field("floats", nullable=True),
    "rope_short_mscale": Field("float", nullable=True),
    "rope_long_mscale": Field("float", nullable=True),
    "norm_type": Field("str", choices=("rms", "layer")),
    "lm_head_bias": Field("bool"),
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MANIFEST_NEEDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim",  # no default
                  "rms_norm_eps", "rope_theta", "max_position_embeddings")  # read by the runtimes as they are
#   a manifest's config must hold these; the others may be absent (added later, with a neutral default)


def cache_dims(config: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of each layer's cached key and value tensors ``[batch, heads, past, width]`` for a
    config (a MoEConfig's fields or a manifest's config). Standard attention caches its kv heads:
    (num_key_value_heads, head_dim) twice. MLA (kv_lora_rank > 0) caches what transformers' DeepSeek
    models cache: the RMS-normed compressed kv as the key, (1, kv_lora_rank), and the roped key part
    every head shares as the value, (1, head_dim)."""
    if config.get("kv_lora_rank"):
        return (1, int(config["kv_lora_rank"])), (1, int(config["head_dim"]))
    kv = (int(config["num_key_value_heads"]), int(config["head_dim"]))
    return kv, kv


def held(name: str, value: Any) -> Any:
    """A checked value of field ``name`` as MoEConfig holds it: floats as float, layer lists (JSON
    arrays in config.json and manifests) as tuples."""
    kind = FIELDS[name].kind if name in FIELDS else None
    if value is not None and kind == "float":
        return float(value)
    if value is not None and kind == "floats":
        return tuple(float(v) for v in value)
    if value is not None and kind == "layers":
        return tuple(value)
    return value


class Problem(NamedTuple):
    """The first thing wrong: the key (as the caller names it), what is wrong with it, the value
    shown, what was expected."""

    key: str
    what: str
    given: str
    expected: str


def problems(values: Mapping[str, Any], key: Callable[[str], str] = str,
             required: tuple[str, ...] = ()) -> Iterator[Problem]:
    """Every field of ``values`` (a name in FIELDS -> its value) checked against its declaration,
    then across fields; ``key`` names a field the way the reader's file does."""
    for name in required:
        if name not in values:
            yield Problem(key(name), "is missing", "missing", "present (a required field)")
    for name, spec in FIELDS.items():
        if name in values and not spec.accepts(values[name]):
            yield Problem(key(name), f"must be {spec.expected()}", shown(values[name]), spec.expected())
    yield from _across(values, key)


def first(values: Mapping[str, Any], key: Callable[[str], str] = str,
          required: tuple[str, ...] = ()) -> Problem | None:
    return next(problems(values, key, required), None)


def _across(v: Mapping[str, Any], key: Callable[[str], str]) -> Iterator[Problem]:
    heads, kv = v.get("num_attention_heads"), v.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv):
        if kv > heads:
            yield Problem(key("num_key_value_heads"), f"exceeds '{key('num_attention_heads')}'",
                          f"{kv} > {heads}", "key/value heads <= attention heads")
        elif heads % kv:
            yield Problem(key("num_attention_heads"), f"is not a multiple of '{key('num_key_value_heads')}'",
                          f"{heads} / {kv}", "an integer ratio")
    top_k, experts = v.get("num_experts_per_tok"), v.get("num_local_experts")
    if _is_int(top_k) and _is_int(experts) and top_k > experts:
        yield Problem(key("num_experts_per_tok"), f"exceeds '{key('num_local_experts')}'",
                      f"{top_k} > {experts}", "top-k <= number of experts")
    yield from _routing(v, key)
    layers = v.get("num_hidden_layers")
    for name in ("dense_layers", "sliding_layers"):
        given = v.get(name)
        if _is_int(layers) and isinstance(given, (list, tuple)) and any(_is_int(i) and i >= layers for i in given):
            yield Problem(key(name), "names a layer the model does not have", f"{list(given)} ({layers} layers)",
                          f"layer indices in [0, {layers})")
    if _is_int(layers) and isinstance(v.get("dense_layers"), (list, tuple)) and len(v["dense_layers"]) >= layers:
        yield Problem(key("dense_layers"), "leaves no layer with experts", shown(list(v["dense_layers"])),
                      "at least one sparse-MoE layer")
    if v.get("dense_layers") and v.get("dense_intermediate_size") == 0:
        yield Problem(key("dense_intermediate_size"), "must be > 0 when some layers are dense MLPs", "0",
                      "the dense MLP's intermediate size")
    yield from _mla(v, key)
    vocab = v.get("vocab_size")
    for name in TOKEN_IDS:
        ids = v.get(name)
        for i in ids if isinstance(ids, list) else [ids]:
            if _is_int(vocab) and _is_int(i) and i >= vocab:
                yield Problem(key(name), "is outside the vocabulary", f"{i} (vocab_size {vocab})",
                              f"a token id in [0, {vocab})")


def _mla(v: Mapping[str, Any], key: Callable[[str], str]) -> Iterator[Problem]:
    """MLA's fields go together: a value width, one kv head per query head, and no other attention's switches."""
    if not (_is_int(v.get("kv_lora_rank")) and v["kv_lora_rank"] > 0):
        for name in ("q_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if _is_int(v.get(name)) and v[name] and v.get("kv_lora_rank") == 0:
                yield Problem(key("kv_lora_rank"), f"must be > 0 with '{key(name)}' set", "0",
                              "the compressed kv width of multi-head latent attention (MLA)")
            elif _is_int(v.get(name)) and v[name]:
                yield Problem(key(name), "is set without MLA", str(v[name]),
                              f"0 unless '{key('kv_lora_rank')}' > 0 (multi-head latent attention)")
        if v.get("rope_layout", "half") != "half":
            yield Problem(key("rope_layout"), "is set without MLA", shown(v["rope_layout"]), '"half"')
        return
    if v.get("v_head_dim") == 0:
        yield Problem(key("v_head_dim"), "must be > 0 with MLA", "0", "each value head's width")
    heads, kv = v.get("num_attention_heads"), v.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads != kv:
        yield Problem(key("num_key_value_heads"), "must equal the attention heads with MLA", f"{kv} (heads {heads})",
                      "num_key_value_heads = num_attention_heads (each head expands its own k and v)")


def _routing(v: Mapping[str, Any], key: Callable[[str], str]) -> Iterator[Problem]:
    """Grouped top-k and sparsemixer against the expert count and k (``ops.RoutingSpec.problem``)."""
    experts, k = v.get("num_local_experts"), v.get("num_experts_per_tok")
    groups, kept = v.get("n_group", 1), v.get("topk_group", 1)
    if not all(_is_int(n) for n in (experts, k, groups, kept)):
        return
    if experts % groups:
        yield Problem(key("n_group"), f"does not divide '{key('num_local_experts')}'", f"{groups} / {experts}",
                      "a divisor of the expert count")
    elif kept > groups:
        yield Problem(key("topk_group"), f"exceeds '{key('n_group')}'", f"{kept} > {groups}", "groups kept <= groups")
    elif groups > 1 and v.get("group_score") == "top2_sum" and experts // groups < 2:
        yield Problem(key("n_group"), "leaves groups of one expert (their score sums the two best)",
                      f"{groups} groups of {experts} experts", "groups of at least 2 experts")
    elif groups > 1 and k > kept * (experts // groups):
        yield Problem(key("num_experts_per_tok"), "exceeds the experts of the groups kept",
                      f"{k} > {kept} x {experts // groups}", "top-k <= topk_group x experts per group")
    if v.get("scoring") == "sparsemixer" and k != 2:
        yield Problem(key("num_experts_per_tok"), "must be 2 with sparsemixer routing", str(k), "2")
