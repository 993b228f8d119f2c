"""Shared IPluginV3 glue: lifecycle, fields, formats; subclasses add shapes and enqueue.

The plugin logic lives in plain Python classes (``PluginCore``, ``CreatorCore``);
``bind_plugin`` / ``bind_creator`` mix them with the IPluginV3 bases of the
TensorRT module actually in use (full TensorRT or TensorRT-RTX), once per module.
Errors are raised as exceptions, never asserted: the Python bindings turn an
exception into a TensorRT error (the C++ return-code path is not exposed).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

from mixport.errors import PluginError
from mixport.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION
from mixport.plugins.fields import FieldBlock, FieldSpec, FieldValue, parse_fields

log = logging.getLogger("mixport.plugins")

FLOAT_TYPES = ("FLOAT", "HALF", "BF16")  # DataType names accepted for float tensors
KERNEL_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}  # DataType -> kernels' dtype name


def type_name(desc: Any) -> str:
    """The DataType name ("FLOAT", "HALF", ...) of a (Dynamic)PluginTensorDesc."""
    return getattr(desc, "desc", desc).type.name


class PluginCore:
    """The body of one mixport IPluginV3 (core + build + runtime capabilities)."""

    op_name: ClassVar[str]
    version: ClassVar[str] = PLUGIN_VERSION  # the node's plugin_version this plugin implements
    field_specs: ClassVar[tuple[FieldSpec, ...]]
    n_outputs: ClassVar[int]

    def __init__(self, trt: ModuleType, values: dict[str, FieldValue], phase: Any = None) -> None:
        for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                     trt.IPluginV3OneRuntime):
            base.__init__(self)
        self.trt = trt
        self.values = dict(values)
        self.phase = phase
        self.tactic = 0
        self.num_outputs = self.n_outputs
        self.plugin_name = self.op_name
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = self.version
        # Same fields -> same kernels: instances share one timing-cache entry.
        self.timing_cache_id = f"{self.op_name}@{self.version}:" + ",".join(f"{k}={v}" for k, v in
                                                            sorted(self.values.items()))
        self._serialized: FieldBlock | None = None

    # -- core ---------------------------------------------------------------
    def get_capability_interface(self, capability_type: Any) -> PluginCore:
        return self

    def clone(self) -> PluginCore:
        return type(self)(self.trt, self.values, self.phase)

    # -- build --------------------------------------------------------------
    def configure_plugin(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        dims = [tuple(int(d) for d in desc.desc.dims) for desc in inputs]
        for what, found, expected in self.shape_checks(dims):
            if found >= 0 and found != expected:  # -1: not known until runtime
                error = PluginError(f"mixport::{self.op_name}: {what} does not match the node",
                                    given=found, expected=expected,
                                    hint=f"node fields: {self.values}")
                log.error("%s", error)
                raise error

    def shape_checks(self, dims: list[tuple[int, ...]]) -> list[tuple[str, int, int]]:
        """(what, found, expected) pairs checked at build time; -1 dims are skipped."""
        return []

    def get_valid_tactics(self) -> list[int]:
        return []  # one implementation: TensorRT passes the default tactic 0

    def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format != self.trt.TensorFormat.LINEAR:
            return False
        return self.accepts_type(pos, [type_name(d) for d in in_out[: pos + 1]], num_inputs)

    def accepts_type(self, pos: int, names: list[str], num_inputs: int) -> bool:
        """Whether tensor ``pos`` may have type ``names[pos]`` given earlier tensors' types."""
        raise NotImplementedError

    # -- runtime ------------------------------------------------------------
    def attach_to_context(self, context: Any) -> PluginCore:
        return self.clone()

    def on_shape_change(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        return None

    def set_tactic(self, tactic: int) -> None:
        self.tactic = int(tactic)

    def get_fields_to_serialize(self) -> Any:
        self._serialized = FieldBlock(self.trt, self.field_specs, self.values)
        return self._serialized.collection

    def get_workspace_size(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
        """Bytes of the workspace TensorRT passes to ``enqueue`` (none unless a subclass needs scratch)."""
        return 0

    def enqueue(self, input_desc: Sequence[Any], output_desc: Sequence[Any],
                inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                stream: int) -> None:
        try:
            self.launch(input_desc, output_desc, inputs, outputs, workspace, stream)
        except Exception as exc:  # reported to TensorRT as a failed enqueue
            log.error("mixport::%s enqueue failed: %s", self.op_name, exc)
            raise PluginError(f"mixport::{self.op_name} enqueue failed: {exc}") from exc

    def launch(self, input_desc: Sequence[Any], output_desc: Sequence[Any],
               inputs: Sequence[int], outputs: Sequence[int], workspace: int,
               stream: int) -> None:
        raise NotImplementedError


class CreatorCore:
    """The body of an IPluginCreatorV3One for one ``PluginCore`` subclass."""

    plugin_core: ClassVar[type[PluginCore]]

    def __init__(self, trt: ModuleType) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        core = self.plugin_core
        self.trt = trt
        self.name = core.op_name
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = core.version
        self._declared = FieldBlock(trt, core.field_specs)
        self.field_names = self._declared.collection

    def create_plugin(self, name: str, field_collection: Any, phase: Any) -> Any:
        core = self.plugin_core
        try:
            values = parse_fields(self.trt, core.op_name, core.field_specs, field_collection)
        except PluginError as exc:
            log.error("cannot create mixport::%s %r: %s", core.op_name, name, exc)
            return None
        return bind_plugin(self.trt, core)(self.trt, values, phase)


@functools.cache
def bind_plugin(trt: ModuleType, core: type[PluginCore]) -> type:
    """``core`` mixed with ``trt``'s IPluginV3 bases: the class TensorRT instantiates."""
    bases = (core, trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
             trt.IPluginV3OneRuntime)
    return type(core.__name__, bases, {"__module__": core.__module__})


@functools.cache
def bind_creator(trt: ModuleType, creator: type[CreatorCore]) -> type:
    """``creator`` mixed with ``trt.IPluginCreatorV3One``."""
    bases = (creator, trt.IPluginCreatorV3One)
    return type(creator.__name__, bases, {"__module__": creator.__module__})
