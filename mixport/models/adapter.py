"""The seam between a Hugging Face architecture and mixport: what one model family declares.

A family is one module in ``mixport/models/`` holding one ``Adapter`` subclass, plus its line
in ``registry.ADAPTERS``. The adapter says, as data where it can:

* who it is: ``model_type`` and the ``architectures`` names of its config.json, and the
  transformers class (``hf_class``, by name) that proves the reference's parity;
* how its config.json maps onto ``MoEConfig`` (field names, defaults, derived fields,
  validation);
* how its checkpoint names map onto mixport's state-dict names (the reference model's):
  a prefix, renames, and the stacked-expert tensors to split (transformers 5's layout);
* which reference modules it composes from ``components`` (``decoder_layer``);
* where the tools find things in the reference model (the router, for routing hooks; the
  experts, for the fast ONNX Runtime graph), and whether the fast graph can build it.

This module never imports torch; ``reference_model`` imports the components when called.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from mixport import config_fields
from mixport.errors import ConfigError
from mixport.models import rope
from mixport.models.config import MoEConfig, field_names
from mixport.models.config import defaults as model_defaults
from mixport.typed_json import shown

if TYPE_CHECKING:
    from torch import nn

    from mixport.models.components import DecoderModel

Shape = tuple[int, ...]
Renamed = tuple[str, Shape, tuple]  # (mixport name, its shape, index into the stored tensor; () = all of it)
TRANSPOSE = "transpose"  # as the last entry of a Renamed index: the weight is the transpose of what the rest
#                          selects (GPT-OSS stores its experts [in, out]; mixport's Linear weights are [out, in])


def take(tensor: Any, index: tuple) -> Any:
    """``tensor[index]`` for a Renamed index (a torch tensor or numpy array; TRANSPOSE honoured)."""
    if index and index[-1] == TRANSPOSE:
        return take(tensor, index[:-1]).T
    return tensor[index] if index else tensor

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_local_experts", "num_experts_per_tok")
DERIVED = ("model_type", "num_key_value_heads", "head_dim", "rope_theta", *rope.FIELD_NAMES)  # see derived()
# The fields every family's config.json names alike (Mixtral's); any other MoEConfig field is read only where
# the family's ``hf_fields`` maps it to a config.json key, so that a key another family uses cannot change this one.
COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim", "rms_norm_eps",
          "rope_theta", "max_position_embeddings", "sliding_window", "tie_word_embeddings", "normalization",
          "bos_token_id", "eos_token_id", "pad_token_id", "model_type")


class Adapter:
    """A model family. Class attributes are its declarations; override a method only where
    the family's rule is not expressible as data."""

    # -- identity -------------------------------------------------------------------------
    model_type: ClassVar[str]  # config.json's model_type; the registry key; recorded in the manifest
    architectures: ClassVar[tuple[str, ...]]  # config.json's architectures this adapter reads
    hf_class: ClassVar[str]  # the transformers class that proves parity (imported lazily, by name)

    # -- config.json -> MoEConfig --------------------------------------------------------
    hf_fields: ClassVar[Mapping[str, str | None]] = {}  # MoEConfig field -> config.json key where they differ
    #                                                   (None: not in config.json; defaults or derived() set it)
    aliases: ClassVar[Mapping[str, tuple[str, ...]]] = {}  # MoEConfig field -> other config.json keys for it
    #                                                   (read when the main key is absent; e.g. num_experts)
    derives: ClassVar[tuple[str, ...]] = ()  # MoEConfig fields derived() computes besides DERIVED
    required: ClassVar[tuple[str, ...]] = REQUIRED  # MoEConfig fields config.json must give (config_fields.FIELDS)
    defaults: ClassVar[Mapping[str, Any]] = {}  # the family's values for fields config.json omits
    kv_heads_default: ClassVar[int | None] = None  # num_key_value_heads when config.json omits it (None: one per
    #                                                 query head), as the family's transformers config class

    # -- checkpoint names -> mixport state-dict names ------------------------------------
    hub_prefix: ClassVar[str] = "model."  # on every hub name but the untied lm_head's
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()  # (regex, replacement), after the prefix
    stacked_experts: ClassVar[tuple[tuple[str, str], ...]] = ()  # (regex, group 1 = layer; "gate_up" | "down")

    # -- where things sit in each decoder layer of the reference model (the components' names)
    router_path: ClassVar[str] = "block_sparse_moe.gate"
    experts_path: ClassVar[str] = "block_sparse_moe.experts"
    expert_projections: ClassVar[Mapping[str, str]] = {"gate": "w1", "up": "w3", "down": "w2"}  # SwiGLU roles
    shared_path: ClassVar[str] = "shared_expert"  # the shared expert, inside the MoE block
    shared_gate_path: ClassVar[str] = "shared_expert_gate"  # its sigmoid gate (Linear H -> 1), inside the block
    dense_path: ClassVar[str] = "mlp"  # a dense layer's MLP, in the decoder layer
    mlp_projections: ClassVar[Mapping[str, str]] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    #                                              the shared expert's and the dense MLP's SwiGLU roles

    # -- rotary embeddings (mixport/models/rope.py) ---------------------------------------
    rope_types: ClassVar[tuple[str, ...]] = rope.TYPES  # the rope scalings this family's transformers class
    #                                                    computes as rope.py does (others: refused by name)
    rope_default: ClassVar[Mapping[str, Any] | None] = None  # the rope section when config.json has none

    # -- runtimes -------------------------------------------------------------------------
    fast_graph: ClassVar[bool] = False  # runtime/ort_graph builds every module this family composes

    @property
    def name(self) -> str:
        return self.architectures[0]

    # config ------------------------------------------------------------------------------
    def hf_key(self, field: str) -> str | None:
        """The config.json key of a MoEConfig field (None: derived, never read as is)."""
        if field in self.hf_fields:
            return self.hf_fields[field]
        return None if field in DERIVED or field not in COMMON else field

    def config_from_hf(self, raw: Mapping[str, Any]) -> MoEConfig:
        """Validate a parsed config.json and build the config; ConfigError (one line naming the
        config.json key, the value and what is expected) on anything off."""
        self._check_required(raw)
        check_activation(raw)
        if raw.get("model_type") not in (None, self.model_type):  # transformers would read another family
            raise ConfigError("config.json field 'model_type' contradicts its architectures",
                              given=f"{shown(raw['model_type'])} with architectures {raw.get('architectures')}",
                              expected=f'"{self.model_type}" (a {self.name})')
        values = dict(self.defaults)
        for name in field_names():
            key = self._present_key(raw, name)
            if key is not None:  # null: refused unless the field may be null (as transformers)
                values[name] = raw[key]
        self._check_fields(values)  # before derived() computes with them
        values.update(self.derived(raw))
        self._check_fields(values)
        cfg = MoEConfig(**{k: config_fields.held(k, v) for k, v in values.items()})
        self.validate(cfg)
        return cfg

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Fields computed from config.json rather than copied (DERIVED); their values are checked
        against ``config_fields.FIELDS`` afterwards, under their config.json key."""
        heads, hidden = raw[self.hf_key("num_attention_heads")], raw[self.hf_key("hidden_size")]
        kv = raw.get(self.hf_key("num_key_value_heads") or "num_key_value_heads",
                     self.kv_heads_default)  # absent: the family's default (null: one per head)
        head_dim = raw.get("head_dim")
        if head_dim is None and hidden % heads:  # transformers' default head_dim: hidden_size // heads
            raise ConfigError(f"config.json has no head_dim and '{self.hf_key('hidden_size')}' is not a multiple of "
                              f"'{self.hf_key('num_attention_heads')}'", given=f"{hidden} / {heads}",
                              expected="hidden_size = num_attention_heads * head_dim, or an explicit head_dim")
        return {"model_type": self.model_type, "num_key_value_heads": heads if kv is None else kv,
                "head_dim": hidden // heads if head_dim is None else head_dim,
                **rope.from_hf(raw, float(self.defaults.get("rope_theta", 1e6)), types=self.rope_types,
                               family_default=self.rope_default)}

    def validate(self, cfg: MoEConfig) -> None:
        """Checks across fields beyond ``config_fields`` (which ``config_from_hf`` has run); a family
        adds its own (calling this one)."""
        rope.check_dims(cfg, self.rope_dim(cfg))

    def rope_dim(self, cfg: MoEConfig) -> int:
        """The width RoPE rotates in each head (head_dim; a family with a rope part says its own)."""
        return cfg.head_dim

    def _present_key(self, raw: Mapping[str, Any], field: str) -> str | None:
        """The config.json key ``field`` is read from in ``raw`` (its main key, else an alias), or None."""
        key = self.hf_key(field)
        if key is None:
            return None
        return next((k for k in (key, *self.aliases.get(field, ())) if k in raw), None)

    def _key(self, field: str) -> str:
        """The config.json key a MoEConfig field is read from (a derived one: its own name)."""
        return self.hf_key(field) or field

    def _check_fields(self, values: Mapping[str, Any]) -> None:
        problem = config_fields.first(values, self._key)
        if problem is not None:
            raise ConfigError(f"config.json field '{problem.key}' {problem.what}", given=problem.given,
                              expected=problem.expected if problem.expected not in problem.what else None)

    def _check_required(self, raw: Mapping[str, Any]) -> None:
        keys = [self._present_key(raw, name) or self._key(name) for name in self.required]
        for key in keys:
            if key not in raw:
                raise ConfigError(f"config.json lacks the field '{key}'", given=f"fields {sorted(raw)[:8]}...",
                                  expected=", ".join(keys), hint=f"is this a {self.name} config.json?")
            if raw[key] is None:
                raise ConfigError(f"config.json field '{key}' must be a positive integer", given="null",
                                  expected="an integer > 0")

    def conform(self, cfg: MoEConfig) -> MoEConfig:
        """``cfg`` as this family can have it: each field its config.json cannot express (no key, not
        derived) set to the family's value (Qwen3's per-head q/k norm, Granite's routing order, a
        shared expert Mixtral does not have: none)."""
        from dataclasses import replace

        neutral = model_defaults()
        fixed = {name: self.defaults.get(name, neutral.get(name)) for name in field_names()
                 if self.hf_key(name) is None and name not in DERIVED and name not in self.derives}
        return replace(cfg, model_type=self.model_type, **fixed)

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        """A config.json for ``cfg`` that transformers' ``hf_class`` loads (tiny test models)."""
        d: dict[str, Any] = {}
        for name, value in _asdict(cfg).items():
            key = self.hf_key(name)
            if key is not None:
                d[key] = value
        d.update(architectures=[self.name], model_type=self.model_type,
                 num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                 rope_theta=cfg.rope_theta, rope_parameters=rope.to_hf(cfg), torch_dtype="float32")
        return d

    # checkpoint names --------------------------------------------------------------------
    def checkpoint_names(self, hf_name: str, shape: Shape) -> Iterator[Renamed]:
        """A checkpoint tensor -> the mixport names it holds: one, or one per expert when the
        tensor stacks the experts."""
        name = hf_name.removeprefix(self.hub_prefix)
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        for pattern, kind in self.stacked_experts:
            found = re.search(pattern, name)
            if found:
                yield from self.split_experts(int(found.group(1)), kind, shape)
                return
        yield name, tuple(shape), ()

    def split_experts(self, layer: int, kind: str, shape: Shape) -> Iterator[Renamed]:
        """Stacked experts -> per-expert names: gate_up [E, 2F, H] (gate rows, then up rows),
        down [E, H, F]."""
        for e in range(shape[0]):
            if kind == "gate_up":
                f = shape[1] // 2
                yield self.expert_weight(layer, e, "gate"), (f, shape[2]), (e, slice(0, f))
                yield self.expert_weight(layer, e, "up"), (f, shape[2]), (e, slice(f, 2 * f))
            else:
                yield self.expert_weight(layer, e, "down"), tuple(shape[1:]), (e,)

    def ignorable(self, name: str, shape: Shape, cfg: MoEConfig) -> bool:
        """Whether a checkpoint tensor the reference model does not have may be left unread: a
        stored rotary buffer (computed from the config instead) or an empty tensor. Any other
        unused tensor is refused: the model it belongs to would compute something else."""
        return name.endswith("rotary_emb.inv_freq") or 0 in shape

    def hub_name(self, name: str) -> str:
        """The name the hub's (per-expert) checkpoint gives mixport weight ``name``."""
        return name if name == "lm_head.weight" else self.hub_prefix + name

    # names the tools look up -------------------------------------------------------------
    def router_weight(self, layer: int) -> str:
        return f"layers.{layer}.{self.router_path}.weight"

    def experts_prefix(self, layer: int) -> str:
        return f"layers.{layer}.{self.experts_path}"

    def expert_weight(self, layer: int, expert: int, role: str) -> str:
        """role: gate | up | down."""
        return f"{self.experts_prefix(layer)}.{expert}.{self.expert_projections[role]}.weight"

    def moe_layers(self, cfg: MoEConfig) -> list[int]:
        """The decoder layers with a router (each one TopKRouting node, in this order)."""
        return [i for i in range(cfg.num_hidden_layers) if cfg.is_sparse(i)]

    def moe_block(self) -> str:
        """The MoE block's attribute in a decoder layer (the router's and experts' common parent)."""
        return self.router_path.rsplit(".", 1)[0]

    def shared_weight(self, layer: int, role: str) -> str:
        """The shared expert's weight of ``role`` (gate | up | down | sigmoid gate: "shared_gate")."""
        block = f"layers.{layer}.{self.moe_block()}"
        if role == "shared_gate":
            return f"{block}.{self.shared_gate_path}.weight"
        return f"{block}.{self.shared_path}.{self.mlp_projections[role]}.weight"

    def dense_weight(self, layer: int, role: str) -> str:
        """A dense layer's MLP weight of ``role`` (gate | up | down)."""
        return f"layers.{layer}.{self.dense_path}.{self.mlp_projections[role]}.weight"

    def layout(self):  # -> components.Layout
        """Where this family's decoder layer keeps its modules (the reference model's names)."""
        from mixport.models.components import Layout

        return Layout(moe=self.moe_block(), router=self.router_path.rsplit(".", 1)[1],
                      experts=self.experts_path.rsplit(".", 1)[1],
                      projections=tuple(self.expert_projections[r] for r in ("gate", "up", "down")),
                      shared=self.shared_path, shared_gate=self.shared_gate_path, dense=self.dense_path,
                      mlp_projections=tuple(self.mlp_projections[r] for r in ("gate", "up", "down")))

    # reference model (torch) -------------------------------------------------------------
    def reference_model(self, cfg: MoEConfig) -> DecoderModel:
        """mixport's reference model for ``cfg`` (on the current default device)."""
        from mixport.models.components import DecoderModel

        return DecoderModel(cfg, self.decoder_layer)

    def decoder_layer(self, cfg: MoEConfig, index: int) -> nn.Module:
        """Decoder layer ``index``: attention + sparse MoE (or a dense MLP), in this family's layout."""
        from mixport.models.components import DecoderLayer

        return DecoderLayer(cfg, index, self.layout())

    def transformers_class(self) -> Any:
        """transformers' ``hf_class`` (ImportError when transformers is not installed)."""
        import transformers

        cls = getattr(transformers, self.hf_class, None)
        if cls is None:
            raise ConfigError(f"this transformers has no {self.hf_class}", given=transformers.__version__,
                              expected=f"a transformers release with {self.hf_class}",
                              hint="pip install -U transformers")
        return cls


def read(raw: Mapping[str, Any], key: str, spec: config_fields.Field, default: Any) -> Any:
    """config.json's ``key`` checked against ``spec`` (absent: ``default``); for the keys a family
    reads in ``derived`` (flags and lists that are not MoEConfig fields themselves)."""
    value = raw.get(key, default)
    if not spec.accepts(value):
        raise ConfigError(f"config.json field '{key}' must be {spec.expected()}", given=shown(value))
    return value


def refuse_window(raw: Mapping[str, Any], name: str) -> None:
    """A family without sliding-window attention: transformers' mask ignores a ``sliding_window`` key but its
    KV cache is cropped to it (decode steps then see only the window), so neither reading is transformers'."""
    if raw.get("sliding_window") is not None:
        raise ConfigError(f"config.json field 'sliding_window' is not used by {name} attention",
                          given=shown(raw["sliding_window"]), expected="absent or null",
                          hint="transformers ignores it in the attention mask but crops the KV cache to it")


def check_activation(raw: Mapping[str, Any], key: str = "hidden_act") -> None:
    """Every family here uses SwiGLU experts: refuse another activation by name."""
    act = raw.get(key, "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json field '{key}' names an activation mixport does not implement",
                          given=shown(act), expected='"silu" (SwiGLU experts)')


def _asdict(cfg: MoEConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in field_names()}
