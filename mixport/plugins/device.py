"""TensorRT device buffers seen as torch CUDA tensors (no copies), for ``enqueue``.

torch is imported here, lazily, only when an engine actually runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# DataType name -> (__cuda_array_interface__ typestr, torch dtype name to view as).
# bf16 has no typestr: it travels as int16 and is re-viewed as bfloat16.
_TYPES = {
    "FLOAT": ("<f4", "float32"),
    "HALF": ("<f2", "float16"),
    "BF16": ("<i2", "bfloat16"),
    "INT8": ("|i1", "int8"),  # int8 values, or packed int4 bytes (MoE version 2)
    "INT32": ("<i4", "int32"),
    "INT64": ("<i8", "int64"),
}


class _DeviceBuffer:
    """Exposes one TensorRT buffer through ``__cuda_array_interface__`` (v3)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (int(ptr), False),
            "version": 3, "stream": None,  # caller orders work on TensorRT's stream
        }


def dims_of(desc: Any) -> tuple[int, ...]:
    """The concrete shape of a PluginTensorDesc as a tuple."""
    return tuple(int(d) for d in desc.dims)


def as_tensor(ptr: int, desc: Any) -> Any:
    """A torch CUDA tensor aliasing ``ptr`` with ``desc``'s shape and type."""
    import torch

    type_name = desc.type.name
    if type_name not in _TYPES:
        raise TypeError(f"unsupported tensor type {type_name}; expected one of {sorted(_TYPES)}")
    typestr, torch_name = _TYPES[type_name]
    tensor = torch.as_tensor(_DeviceBuffer(ptr, dims_of(desc), typestr), device="cuda")
    return tensor.view(getattr(torch, torch_name))


def as_bytes(ptr: int, nbytes: int) -> Any:
    """A 1-D uint8 torch CUDA tensor over ``nbytes`` at ``ptr`` (a plugin's workspace)."""
    import torch

    return torch.as_tensor(_DeviceBuffer(ptr, (int(nbytes),), "|u1"), device="cuda")


def all_nonempty(descs: Sequence[Any]) -> bool:
    """False when any tensor has a zero dimension (nothing to compute, nothing to write)."""
    return all(math.prod(dims_of(d)) > 0 for d in descs)


def on_stream(stream: int) -> Any:
    """A context manager making TensorRT's CUDA stream torch's current stream."""
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(int(stream)))
