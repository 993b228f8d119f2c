"""Polygraphy runners for the PyTorch side of a parity check.

Both take a feed of the exported graph's inputs and return its outputs by name, plus, for
the j-th MoE layer (the j-th TopKRouting node: layers with a router only, ``adapter.moe_layers``),
``routing.{j}.logits`` [T, E] fp32 (the router's logits) and ``routing.{j}.ids`` [T, k] (the experts
picked: mixport's Router of that layer applied to the logits, ``Router.selected`` — the top-k of the
logits for softmax or sparsemixer routing, not with a selection bias or groups).
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mixport.errors import CheckUnavailable
from mixport.models import Adapter, registry
from mixport.models.components import DecoderModel


def input_metadata(num_layers: int, dtype: np.dtype = np.float32) -> TensorMetadata:
    """The exported graph's inputs, so Polygraphy hands a runner the whole feed."""
    meta = TensorMetadata()
    for name in ("input_ids", "attention_mask", "position_ids"):
        meta.add(name, np.int64, (-1, -1))
    for i in range(num_layers):
        for kv in ("key", "value"):
            meta.add(f"past_key_values.{i}.{kv}", dtype, (-1, -1, -1, -1))
    return meta


def _routing(logits: list[torch.Tensor], routers: list[Any] | None, k: int, moe_layers: int,
             who: str) -> dict[str, np.ndarray]:
    """routing.{j}.logits / .ids (the experts picked: ``routers[j].selected``, which with a selection bias
    or groups differ from the top-k of the logits) and, for such routing, .choice / .groups (the scores
    the picks are made by, for tie counts) for each MoE layer's router logits [T, E]."""
    if len(logits) != moe_layers:  # a hook or a recorder that missed (or added) a router
        raise CheckUnavailable(f"{who} reported router logits for {len(logits)} layers", given=str(len(logits)),
                               expected=f"{moe_layers} (one per MoE layer)")
    out = {}
    for j, lg in enumerate(logits):
        lg = lg.float().reshape(-1, lg.shape[-1])
        out[f"routing.{j}.logits"] = lg.numpy()
        if routers is None:
            out[f"routing.{j}.ids"] = torch.topk(lg, k, dim=-1).indices.numpy()
            continue
        with torch.no_grad():
            out[f"routing.{j}.ids"] = routers[j].selected(lg).numpy()
            choice, groups = routers[j].choice(lg)
        if choice is not lg:
            out[f"routing.{j}.choice"] = choice.numpy()
        if groups is not None:
            out[f"routing.{j}.groups"] = groups.numpy()
    return out


class _TimedRunner(BaseRunner):
    """Polygraphy wants each runner to report its inference time."""

    def infer_impl(self, feed_dict: OrderedDict) -> OrderedDict:
        start = time.perf_counter()
        out = self._infer(feed_dict)
        self.inference_time = time.perf_counter() - start
        return out

    def _infer(self, feed_dict: OrderedDict) -> OrderedDict:
        raise NotImplementedError


class ReferenceRunner(_TimedRunner):
    """mixport's own reference model; stateless (the past comes from the feed)."""

    def __init__(self, model: DecoderModel, name: str = "pytorch-mixport") -> None:
        super().__init__(name=name, prefix="pyt-ref")
        self.model = model

    def activate_impl(self) -> None:
        self.logits: list[torch.Tensor] = []
        adapter = registry.for_config(self.model.cfg)  # where each MoE layer's router sits (dense layers: none)
        self.routers = [self.model.get_submodule(f"layers.{i}.{adapter.router_path}")
                        for i in adapter.moe_layers(self.model.cfg)]
        self.hooks = [router.register_forward_hook(self._hook) for router in self.routers]

    def _hook(self, module, args, _out) -> None:  # noqa: ANN001
        self.logits.append(module.logits(args[0]))

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.model.cfg.num_hidden_layers)

    def _infer(self, feed_dict: OrderedDict) -> OrderedDict:
        self.logits = []
        n = self.model.cfg.num_hidden_layers
        past = [torch.from_numpy(feed_dict[f"past_key_values.{i}.{kv}"]) for i in range(n)
                for kv in ("key", "value")]
        with torch.no_grad():
            logits, present = self.model(*(torch.from_numpy(feed_dict[k]) for k in
                                           ("input_ids", "attention_mask", "position_ids")), past)
        out = OrderedDict(logits=logits.float().numpy())
        for i in range(n):
            out[f"present.{i}.key"] = present[2 * i].float().numpy()
            out[f"present.{i}.value"] = present[2 * i + 1].float().numpy()
        out.update(_routing(self.logits, self.routers, self.model.cfg.num_experts_per_tok, len(self.routers),
                            self.name))
        return out

    def deactivate_impl(self) -> None:
        for h in self.hooks:
            h.remove()


class TransformersRunner(_TimedRunner):
    """transformers' own class for the family (the adapter's ``hf_class``, e.g.
    MixtralForCausalLM) on the source folder. It keeps its own cache: a feed with an empty
    past starts a new sequence; later feeds must continue it."""

    def __init__(self, model_dir: Path, adapter: Adapter, moe_layers: int, name: str = "pytorch-transformers",
                 routers: list[Any] | None = None) -> None:
        super().__init__(name=name, prefix="pyt-hf")
        self.model_dir = Path(model_dir)
        self.adapter = adapter
        self.moe_layers = moe_layers  # layers with a router (transformers records router logits for these only)
        self.routers = routers  # mixport's Router of each MoE layer: the experts transformers' logits pick

    def activate_impl(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        cls = self.adapter.transformers_class()
        self.model = cls.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.cache = None
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.model.config.num_hidden_layers)

    def _infer(self, feed_dict: OrderedDict) -> OrderedDict:
        if feed_dict["past_key_values.0.key"].shape[2] == 0:
            self.cache = None
        t = {k: torch.from_numpy(feed_dict[k]) for k in ("input_ids", "attention_mask", "position_ids")}
        t[self.cache_arg] = self.cache
        with torch.no_grad():
            res = self.model(**t, use_cache=True, output_router_logits=True)
        self.cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        out = OrderedDict(logits=res.logits.float().numpy())
        total = feed_dict["attention_mask"].shape[1]
        for i, layer in enumerate(self.cache.layers):
            if layer.keys.shape[2] != total:  # a sliding-window layer's cache, cropped to the window by transformers:
                continue  # not comparable with a full present (left out; the logits still are compared)
            out[f"present.{i}.key"] = layer.keys.float().numpy()
            out[f"present.{i}.value"] = layer.values.float().numpy()
        # router_logits: one [T, E] per layer with a router (transformers records each router module's logits)
        out.update(_routing(list(res.router_logits), self.routers, self.model.config.num_experts_per_tok,
                            self.moe_layers, self.name))
        return out

    def deactivate_impl(self) -> None:
        del self.model
