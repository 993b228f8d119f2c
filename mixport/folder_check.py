"""Does an export folder's manifest describe its model.onnx? Checks ``artifact.validate_folder`` runs.

* the manifest's ``config`` against the field schema (``config_fields``): the runtimes size their
  caches and tables from it;
* model.onnx parses as an ONNX model (read without its weights) and passes onnx's checker, whenever
  its content was hashed (it changed since last verified); while its stamp vouches for it, only its
  inputs, outputs and metadata are read (``read_signature``: no initializer byte is read);
* the graph's inputs and outputs agree with the config (layers, key/value heads, head_dim, vocab)
  and the dtype, and the config model.onnx was exported with (its ``mixport.config`` metadata,
  which the manifest hash covers) equals the manifest's, field by field: the context
  (``max_position_embeddings``) appears in no input or output.

Each problem is one ``RuntimeFailure`` line naming the manifest field.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

from mixport import config_fields
from mixport.errors import RuntimeFailure
from mixport.typed_json import shown

CONFIG_METADATA = "mixport.config"  # model.onnx's metadata_props key: the config it was exported with
GRAPH_DTYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
_MODEL_GRAPH, _MODEL_METADATA, _GRAPH_INPUT, _GRAPH_OUTPUT = 7, 14, 11, 12  # onnx.proto's field numbers
_CACHE = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")
_HINT = "export the folder again (mixport export ... --force)"


def record_config(proto: onnx.ModelProto, config: Mapping[str, Any]) -> None:
    """Write ``config`` into PROTO's metadata (the exporter does, before model.onnx is hashed)."""
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        CONFIG_METADATA: json.dumps(dict(config), sort_keys=True)})


def check_config(config: Mapping[str, Any], where: str) -> None:
    """The manifest's ``config``: every field of the schema, named ``config.<field>``."""
    problem = config_fields.first(config, lambda name: f"config.{name}", config_fields.MANIFEST_NEEDS)
    if problem is None:
        return
    if problem.what.startswith(("must be", "is missing")):
        given = f"{where}: {problem.key} is {problem.given}"
    else:
        given = f"{where}: {problem.key} {problem.what} ({problem.given})"
    raise RuntimeFailure("manifest.json is malformed", given=given, expected=problem.expected, hint=_HINT)


def read_graph(path: Path) -> onnx.ModelProto:
    """PATH's graph without its weights; RuntimeFailure (one line) when it is no valid ONNX model,
    FileSystemError when an external-data location leads outside its folder (checked before onnx's
    checker looks for the files)."""
    from mixport import onnx_io  # onnx_ir only here: refusals elsewhere stay quick

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: one line for the user
        raise _invalid(path, exc) from None
    onnx_io.check_external_locations(path, proto)
    try:
        onnx.checker.check_model(str(path))  # by path: external data is looked for beside it, not read
    except Exception as exc:  # onnx's ValidationError...: one line for the user
        raise _invalid(path, exc) from None
    return proto


def _invalid(path: Path, exc: Exception) -> RuntimeFailure:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return RuntimeFailure(f"{path.name} is not a valid ONNX model", given=f"{path}: {first}",
                          expected="the model.onnx `mixport export` wrote", hint=_HINT)


def read_signature(path: Path) -> onnx.ModelProto:
    """PATH's inputs, outputs and metadata only: the protobuf wire format is walked and every other
    field (the initializers: up to 2 GB) is skipped by its length, never read. RuntimeFailure (one
    line) when the file is not well-formed protobuf."""
    model = onnx.ModelProto()
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for field, start, end in wire_fields(buf, 0, len(buf)):
                if field == _MODEL_METADATA:
                    model.metadata_props.add().ParseFromString(buf[start:end])
                elif field == _MODEL_GRAPH:
                    for part, begin, stop in wire_fields(buf, start, end):
                        if part in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                            values = model.graph.input if part == _GRAPH_INPUT else model.graph.output
                            values.add().ParseFromString(buf[begin:stop])
    except Exception as exc:  # ValueError (an empty file, a length past the end), DecodeError, OSError
        raise RuntimeFailure(f"{path.name} is not a valid ONNX model", given=f"{path}: {str(exc)[:200]}",
                             expected="the model.onnx `mixport export` wrote", hint=_HINT) from None
    return model


def wire_fields(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[pos:end]
    (also used by ``runtime.onnx_locate``)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        kind = key & 7
        if kind == 0:
            pos = _varint(buf, pos, end)[1]
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        elif kind == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise ValueError(f"field {key >> 3} runs {pos + size - end} bytes past its message")
            yield key >> 3, pos, pos + size
            pos += size
        else:
            raise ValueError(f"wire type {kind} at byte {pos}")
    if pos != end:
        raise ValueError("the last field is cut short")


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise ValueError("the file ends inside a number")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError(f"a number longer than 10 bytes at byte {pos}")


def check_graph(proto: onnx.ModelProto, config: Mapping[str, Any], dtype: str, where: str,
                signature: Mapping[str, tuple[list, list]]) -> None:
    """The graph's signature and recorded config agree with the (schema-checked) manifest;
    ``signature``: inputs | outputs -> (as the manifest records them, as the graph has them)."""
    for part, (recorded, actual) in signature.items():
        if recorded and recorded != actual:
            wrong = next((r.name for r, a in zip(recorded, actual, strict=False) if r != a), f"{len(recorded)} "
                         f"of them, model.onnx has {len(actual)}")
            raise _disagrees(where, part, f"wrong at {wrong}"[:200], f"model.onnx's {part}")
    if dtype not in GRAPH_DTYPES:
        raise RuntimeFailure("manifest.json is malformed", given=f"{where}: dtype is {shown(dtype)}",
                             expected=" | ".join(GRAPH_DTYPES), hint=_HINT)
    _check_recorded(proto, config, where)
    values = {**{v.name: v for v in proto.graph.input}, **{v.name: v for v in proto.graph.output}}
    for name in ("input_ids", "attention_mask", "position_ids", "logits"):
        if name not in values:
            raise _disagrees(where, "inputs", f"model.onnx has no {name}", "the graph `mixport export` wrote")
    layers = sorted({int(m.group(2)) for m in map(_CACHE.match, values) if m})
    if layers != list(range(config["num_hidden_layers"])):
        raise _disagrees(where, "config.num_hidden_layers", f"{config['num_hidden_layers']}, model.onnx has "
                         f"{len(layers)} layers of cache (past_key_values.*)", "the graph's layer count")
    _dim(values["logits"], -1, config["vocab_size"], "config.vocab_size", where)
    dims = dict(zip(("key", "value"), config_fields.cache_dims(config), strict=True))
    mla = bool(config.get("kv_lora_rank"))  # MLA: [batch, 1, seq, kv_lora_rank] and [batch, 1, seq, head_dim]
    for name, value in values.items():
        found = _CACHE.match(name)
        if found:  # [batch, kv heads, seq, head_dim]
            heads, width = dims[found.group(3)]
            _dim(value, 1, heads, "config.num_key_value_heads" if not mla else "config.kv_lora_rank", where)
            _dim(value, 3, width, "config.kv_lora_rank" if mla and found.group(3) == "key" else "config.head_dim",
                 where)
            if value.type.tensor_type.elem_type != GRAPH_DTYPES[dtype]:
                graph_type = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
                raise _disagrees(where, "dtype", f"{dtype}, model.onnx's cache {name} is {graph_type}",
                                 "the graph's cache type")


def _check_recorded(proto: onnx.ModelProto, config: Mapping[str, Any], where: str) -> None:
    props = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_METADATA not in props:  # exported before mixport recorded it: the signature is all there is
        return
    try:
        recorded = json.loads(props[CONFIG_METADATA])
        assert isinstance(recorded, dict)
    except (ValueError, AssertionError, RecursionError):
        raise RuntimeFailure("model.onnx is not a valid mixport graph", given=f"its {CONFIG_METADATA} metadata "
                             f"is {shown(props[CONFIG_METADATA])}", expected="a JSON object", hint=_HINT) from None
    for name, value in recorded.items():
        if config.get(name) != value:
            raise _disagrees(where, f"config.{name}", f"{shown(config.get(name))}, model.onnx was exported with "
                             f"{shown(value)}", f"{shown(value)} (the exported model's)")


def _dim(value: onnx.ValueInfoProto, axis: int, want: int, field: str, where: str) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims or len(dims) <= axis % max(len(dims), 1):
        raise _disagrees(where, field, f"{want}, model.onnx's {value.name} has rank {len(dims)}",
                         "the graph's shape")
    dim = dims[axis]
    if dim.HasField("dim_value") and dim.dim_value != want:
        raise _disagrees(where, field, f"{want}, model.onnx's {value.name} has {dim.dim_value} on axis "
                         f"{axis % len(dims)}", f"{dim.dim_value} (the graph's)")


def _disagrees(where: str, field: str, given: str, expected: str) -> RuntimeFailure:
    return RuntimeFailure(f"manifest.json disagrees with model.onnx on {field}", given=f"{where}: {field} is {given}",
                          expected=expected, hint=_HINT)
