"""Register the mixport plugin creators with TensorRT's plugin registry.

One creator per (op, plugin_version) a file may carry: ``TopKRouting`` "2" (with ``order``)
and "1" (older files), ``MoE`` "1" (float experts), "2" (quantized experts) and "3" (expert biases,
clamped SwiGLU: GPT-OSS). The ONNX parser
picks the creator by the node's ``plugin_version`` attribute.
"""

from __future__ import annotations

from types import ModuleType

from mixport.errors import PluginError
from mixport.ops import PLUGIN_NAMESPACE
from mixport.plugins import trt_import
from mixport.plugins.base import CreatorCore, bind_creator
from mixport.plugins.moe_plugin import MoECreator, MoEV2Creator, MoEV3Creator
from mixport.plugins.topk_routing_plugin import TopKRoutingCreator, TopKRoutingV1Creator, TopKRoutingV2Creator

CREATORS: tuple[type[CreatorCore], ...] = (TopKRoutingCreator, TopKRoutingV2Creator, TopKRoutingV1Creator, MoECreator,
                                          MoEV2Creator, MoEV3Creator)
# Creators must outlive the registry's use of them: keep one per (module, class).
_LIVE: dict[tuple[str, str], object] = {}


def _key(creator: type[CreatorCore]) -> tuple[str, str]:
    """(op name, plugin version) of a creator."""
    return creator.plugin_core.op_name, creator.plugin_core.version


def plugin_ids() -> list[str]:
    """``namespace::name@version`` for every mixport plugin."""
    return [f"{PLUGIN_NAMESPACE}::{name}@{version}" for name, version in map(_key, CREATORS)]


def register_plugins(trt_module: ModuleType | None = None) -> list[str]:
    """Register every mixport creator (idempotent); returns their ``ns::name@version`` ids."""
    trt = trt_module or trt_import.import_trt()
    registry = trt.get_plugin_registry()
    for creator_core, plugin_id in zip(CREATORS, plugin_ids(), strict=True):
        name, version = _key(creator_core)
        if registry.get_creator(name, version, PLUGIN_NAMESPACE) is not None:
            continue  # already registered, by us or by an earlier process-wide call
        creator = bind_creator(trt, creator_core)(trt)
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise PluginError(f"TensorRT refused to register {plugin_id}",
                              given=trt_import.describe(trt),
                              hint="another creator with this name/version/namespace exists")
        _LIVE[(trt.__name__, plugin_id)] = creator
    return plugin_ids()


def plugins_registered(trt_module: ModuleType | None = None) -> bool:
    """True when every mixport creator is present in the registry."""
    trt = trt_module or trt_import.import_trt()
    registry = trt.get_plugin_registry()
    return all(registry.get_creator(name, version, PLUGIN_NAMESPACE) is not None
               for name, version in map(_key, CREATORS))


def trt_flavor(trt_module: ModuleType | None = None) -> str:
    """Which TensorRT is in use, e.g. "TensorRT-RTX 1.7.1.116 (tensorrt_rtx_bindings)"."""
    return trt_import.describe(trt_module or trt_import.import_trt())
