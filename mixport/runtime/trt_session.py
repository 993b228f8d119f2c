"""TensorRT backend of the Session interface: one engine, one execution context, cache on the GPU.

The exported graph concatenates: it takes past [B, KVH, P, D] and returns present
[B, KVH, P+S, D]. So the cache cannot be a preallocated max-length buffer written
in place; instead every present tensor stays on the device and is bound, as is,
as the next step's past (no host round trip, no copy). Output buffers come from
torch's caching allocator. Only the logits [B, S, V] travel to the host.

``BindingPlan`` is the CPU-side half (names, shapes per step, profile checks,
read from the manifest's ``engine`` section) and is tested without a GPU;
``TrtSession`` is the small GPU half (B batch, S new tokens, P cached tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure

Shape = tuple[int, ...]
# TensorRT DataType name -> torch dtype name
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
                "INT32": "int32", "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def torch_dtype_name(trt_dtype_name: str) -> str:
    """The torch dtype name for a TensorRT DataType name; RuntimeFailure when unknown."""
    if trt_dtype_name not in TORCH_DTYPES:
        raise RuntimeFailure("the engine has a tensor type mixport cannot bind", given=trt_dtype_name,
                             expected=", ".join(TORCH_DTYPES))
    return TORCH_DTYPES[trt_dtype_name]


@dataclass(frozen=True)
class BindingPlan:
    """Input names and shapes of each step, checked against the engine's optimization profile."""

    layers: int
    kv_heads: int
    head_dim: int
    profiles: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max), as built
    cache: tuple[tuple[int, int], ...] = ()  # (heads, width) per past tensor; (): all (kv_heads, head_dim)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> BindingPlan:
        cfg, record = manifest.config, manifest.engine
        profiles = {name: tuple(tuple(int(d) for d in s) for s in shapes)
                    for name, shapes in (record.profiles if record else {}).items()}
        return cls(cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"], profiles,
                   tuple(manifest.cache_shapes()))

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def input_shapes(self, batch: int, seq: int, past: int) -> dict[str, Shape]:
        """Every input's shape for a step of ``seq`` new tokens after ``past`` cached ones."""
        shapes: dict[str, Shape] = {"input_ids": (batch, seq), "attention_mask": (batch, past + seq),
                                    "position_ids": (batch, seq)}
        dims = self.cache or ((self.kv_heads, self.head_dim),) * len(self.past_names)
        for name, (heads, width) in zip(self.past_names, dims, strict=True):
            shapes[name] = (batch, heads, past, width)
        return shapes

    def max_tokens(self) -> int | None:
        """The most cached + new tokens the profile allows (attention_mask's max), if known."""
        mask = self.profiles.get("attention_mask")
        return mask[2][1] if mask else None

    def check(self, shapes: dict[str, Shape]) -> None:
        """RuntimeFailure naming the first input outside the profile, and how to rebuild."""
        for name, shape in shapes.items():
            if name not in self.profiles:
                continue
            lo, _opt, hi = self.profiles[name]
            bad = [a for a, d in enumerate(shape) if not lo[a] <= d <= hi[a]] if len(lo) == len(shape) else [-1]
            if bad:
                raise RuntimeFailure(
                    f"input {name!r} is outside the engine's optimization profile", given=shape,
                    expected=f"between {lo} and {hi}",
                    hint="rebuild with wider ranges: mixport build FOLDER --force --batch MIN:OPT:MAX "
                         "--seq MIN:OPT:MAX --past MIN:OPT:MAX, or use --backend onnxruntime")


class TrtSession:
    """model.engine in one execution context; present tensors stay on the GPU as the next past."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path, manifest: Manifest) -> None:
        import torch

        from mixport.engine.trt_logger import make_logger
        from mixport.plugins.registry import register_plugins
        from mixport.plugins.trt_import import import_trt

        trt = import_trt()
        register_plugins(trt)  # before deserializing: the engine names the creators
        self.torch, self.plan, self.device = torch, BindingPlan.from_manifest(manifest), torch.device("cuda")
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeFailure("TensorRT could not deserialize the engine", given=str(engine_path),
                                 expected="an engine built by this TensorRT for this GPU",
                                 hint="; ".join(self.logger.errors) or "mixport build FOLDER --force")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.context.set_optimization_profile_async(0, self.stream.cuda_stream)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.past: list[Any] = []
        self.past_len = 0
        self.batch = 0

    def _dtype(self, name: str) -> Any:
        return getattr(self.torch, torch_dtype_name(self.engine.get_tensor_dtype(name).name))

    def _bind(self, name: str, tensor: Any) -> None:
        # TensorRT wants a valid address even for an empty tensor: give it a 1-element buffer
        ptr = tensor.data_ptr() if tensor.numel() else self._spare.data_ptr()
        self.context.set_tensor_address(name, ptr)

    def execute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """One inference on device tensors (contiguous, on the GPU); every output by name.

        Call it inside ``with torch.cuda.stream(self.stream)``: copies, allocations and
        the engine then share one stream, in order.
        """
        self._spare = self.torch.empty(16, dtype=self.torch.uint8, device=self.device)
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self._bind(name, tensor)
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out[name] = self.torch.empty(shape, dtype=self._dtype(name), device=self.device)
            self._bind(name, out[name])
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeFailure("TensorRT failed to run the engine", given="; ".join(self.logger.errors))
        return out

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One raw inference from host arrays (Polygraphy-runner shaped)."""
        self.plan.check({name: tuple(a.shape) for name, a in feed.items()})
        with self.torch.cuda.stream(self.stream):
            inputs = {name: self._to_device(a, name) for name, a in feed.items()}
            out = self.execute(inputs)
            self.stream.synchronize()
        return {name: t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                for name, t in out.items()}

    def _to_device(self, array: np.ndarray, name: str) -> Any:
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(device=self.device, dtype=self._dtype(name))

    def reset(self, batch: int) -> None:
        shape = self.plan.input_shapes(batch, 1, 0)[self.plan.past_names[0]]
        dtype = self._dtype(self.plan.past_names[0])
        with self.torch.cuda.stream(self.stream):
            self.past = [self.torch.empty(shape, dtype=dtype, device=self.device) for _ in self.plan.past_names]
        self.past_len, self.batch = 0, batch

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        self.plan.check(self.plan.input_shapes(batch, seq, self.past_len))
        with self.torch.cuda.stream(self.stream):
            host = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            inputs = {name: self._to_device(a, name) for name, a in host.items()}
            inputs.update(zip(self.plan.past_names, self.past, strict=True))
            out = self.execute(inputs)
            logits = out["logits"].float().cpu()  # waits for the stream
        self.past = [out[name] for name in self.plan.present_names]
        self.past_len += seq
        return logits.numpy()

    def close(self) -> None:
        self.past, self.context, self.engine = [], None, None
