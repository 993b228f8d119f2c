"""An export folder whose model.onnx is corrupt (hash updated to match), whose manifest has fields of
the wrong type, or whose manifest disagrees with the graph: one `error:` line from every command that
opens a folder (run, check, bench, build), naming the field (mixport.folder_check through
artifact.validate_folder)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from mixport import artifact, config_fields, folder_check
from mixport.errors import RuntimeFailure
from mixport.models.config import defaults, field_names
from tests.helpers import invoke, one_line_error

COMMANDS = {
    "run": lambda f: ("run", f, "--prompt", "1 2 3", "--max-new-tokens", "2"),
    "check": lambda f: ("check", f, "--steps", "1"),
    "bench": lambda f: ("bench", f, "--prompt-len", "2", "--new-tokens", "2", "--runs", "1"),
    "build": lambda f: ("build", f),
}


def _rehash(folder: Path, forge_stamp: bool = False) -> None:
    """The manifest's hash updated to match an edited model.onnx (the stamp left as it was: the file
    is hashed, then checked whole); ``forge_stamp``: its size and mtime too, so that it is trusted
    unread (only its inputs, outputs and metadata are read)."""
    manifest = artifact.Manifest.read(folder)
    now = artifact.stamp(folder / artifact.MODEL_FILE)
    stamps = {artifact.MODEL_FILE: now} if forge_stamp else manifest.stamps
    dataclasses.replace(manifest, onnx_sha256=now.sha256, stamps=stamps).write(folder)


def _edit_graph(folder: Path, change: Callable[[onnx.ModelProto], None]) -> None:
    proto = onnx.load(str(folder / artifact.MODEL_FILE))
    change(proto)
    onnx.save(proto, str(folder / artifact.MODEL_FILE))
    _rehash(folder)


def _edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((folder / artifact.MANIFEST).read_text())
    change(data)
    (folder / artifact.MANIFEST).write_text(json.dumps(data))


def _without_recorded_config(proto: onnx.ModelProto) -> None:
    """A graph exported before mixport recorded its config (only the signature tells)."""
    props = {p.key: p.value for p in proto.metadata_props if p.key != folder_check.CONFIG_METADATA}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)


def _expect_everywhere(folder: Path, *fragments: str) -> None:
    for name, args in COMMANDS.items():
        result = invoke(*args(folder))
        assert "Traceback" not in result.output, (name, result.output)
        one_line_error(result, *fragments)


def _corrupt_bytes(folder: Path) -> None:
    (folder / artifact.MODEL_FILE).write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0fnot an onnx model" * 40)


def _truncate(folder: Path) -> None:
    path = folder / artifact.MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _dangling_node_input(folder: Path) -> None:
    _edit_graph(folder, lambda p: p.graph.node[3].input.__setitem__(0, "no_such_tensor"))


@pytest.mark.parametrize("corrupt", [_corrupt_bytes, _truncate, _dangling_node_input],
                         ids=["garbage", "truncated", "dangling-input"])
def test_corrupt_model_onnx_with_the_hash_updated_is_one_line_everywhere(export_copy: Path,
                                                                         corrupt: Callable[[Path], None]) -> None:
    corrupt(export_copy)
    _rehash(export_copy)
    assert artifact.Manifest.read(export_copy).onnx_sha256 == artifact.file_sha256(export_copy / "model.onnx")
    _expect_everywhere(export_copy, "model.onnx is not a valid ONNX model", str(export_copy / "model.onnx"))


@pytest.mark.parametrize("corrupt", [_corrupt_bytes, _truncate, lambda f: (f / "model.onnx").write_bytes(b"")],
                         ids=["garbage", "truncated", "empty"])
def test_corrupt_model_onnx_with_a_forged_stamp_is_one_line(export_copy: Path,
                                                            corrupt: Callable[[Path], None]) -> None:
    """Hash, size and mtime all forged: model.onnx is trusted unread, but its signature is still read."""
    corrupt(export_copy)
    _rehash(export_copy, forge_stamp=True)
    for name in ("run", "bench"):
        result = invoke(*COMMANDS[name](export_copy))
        assert "Traceback" not in result.output, (name, result.output)
        one_line_error(result, "model.onnx")


def test_the_signature_is_read_without_the_weights(export_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged folder: model.onnx is neither parsed whole nor checked (multi-GB files stay unread)."""
    expected = onnx.load(str(export_copy / artifact.MODEL_FILE), load_external_data=False)
    signature = folder_check.read_signature(export_copy / artifact.MODEL_FILE)
    assert list(signature.graph.input) == list(expected.graph.input)
    assert list(signature.graph.output) == list(expected.graph.output)
    assert list(signature.metadata_props) == list(expected.metadata_props) and not signature.graph.initializer
    monkeypatch.setattr(folder_check, "read_graph", lambda path: pytest.fail("parsed whole"))
    artifact.validate_folder(export_copy, artifact.Manifest.read(export_copy))


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda m: m["config"].update(num_hidden_layers="2"), ['config.num_hidden_layers is "2"', "positive integer"]),
    (lambda m: m["config"].pop("vocab_size"), ["config.vocab_size is missing"]),
    (lambda m: m["config"].pop("max_position_embeddings"), ["config.max_position_embeddings is missing"]),
    (lambda m: m.update(dtype=5), ["dtype is 5", "expected: a string"]),
    (lambda m: m.update(dtype="int3"), ['dtype is "int3"', "fp32 | fp16 | bf16"]),
    (lambda m: m["config"].update(head_dim=-16), ["config.head_dim is -16", "even integer"]),
    (lambda m: m["config"].update(max_position_embeddings=0), ["config.max_position_embeddings is 0"]),
    (lambda m: m["config"].update(max_position_embeddings=2**40), ["config.max_position_embeddings is 1099511627776"]),
    (lambda m: m["config"].update(rope_theta="abc"), ['config.rope_theta is "abc"', "finite number"]),
    (lambda m: m["config"].update(sliding_window=-5), ["config.sliding_window is -5"]),
    (lambda m: m["config"].update(eos_token_id=[2, 99999]), ["config.eos_token_id is outside the vocabulary"]),
    (lambda m: m["config"].update(num_key_value_heads=8), ["config.num_key_value_heads exceeds"]),
    (lambda m: m.update(config=[1, 2]), ["config is a list", "expected: an object"]),
])
def test_manifest_fields_of_the_wrong_type_or_range_are_one_line_everywhere(
        export_copy: Path, change: Callable[[dict[str, Any]], None], fragments: list[str]) -> None:
    _edit_manifest(export_copy, change)
    _expect_everywhere(export_copy, "manifest.json is malformed", *fragments)


DISAGREE = [  # manifest config edits the schema accepts but model.onnx contradicts
    ({"num_hidden_layers": 3}, "config.num_hidden_layers", True),
    ({"num_key_value_heads": 4}, "config.num_key_value_heads", True),
    ({"head_dim": 32}, "config.head_dim", True),
    ({"vocab_size": 600}, "config.vocab_size", True),
    ({"max_position_embeddings": 1024}, "config.max_position_embeddings", False),  # in no input or output
    ({"rope_theta": 20000.0}, "config.rope_theta", False),
]


@pytest.mark.parametrize(("changes", "field", "in_signature"), DISAGREE, ids=[d[1] for d in DISAGREE])
def test_a_manifest_that_disagrees_with_the_graph_is_one_line_naming_the_field(
        export_copy: Path, changes: dict[str, Any], field: str, in_signature: bool) -> None:
    _edit_manifest(export_copy, lambda m: m["config"].update(changes))
    _expect_everywhere(export_copy, "manifest.json disagrees with model.onnx on " + field)
    # an export from before model.onnx recorded its config: the graph's signature still tells
    _edit_graph(export_copy, _without_recorded_config)
    manifest = artifact.Manifest.read(export_copy)
    if in_signature:
        with pytest.raises(RuntimeFailure, match=f"disagrees with model.onnx on {field}"):
            artifact.validate_folder(export_copy, manifest)
    else:
        artifact.validate_folder(export_copy, manifest)


def test_dtype_and_recorded_signature_must_match_the_graph(export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda m: m.update(dtype="fp16"))
    one_line_error(invoke(*COMMANDS["run"](export_copy)), "disagrees with model.onnx on dtype", "float")
    _edit_manifest(export_copy, lambda m: m.update(dtype="fp32"))
    _edit_manifest(export_copy, lambda m: m["inputs"][3]["shape"].__setitem__(1, 7))
    one_line_error(invoke(*COMMANDS["run"](export_copy)), "disagrees with model.onnx on inputs",
                   "past_key_values.0.key")
    _edit_manifest(export_copy, lambda m: m["outputs"].pop())
    _edit_manifest(export_copy, lambda m: m["inputs"][3]["shape"].__setitem__(1, 2))
    one_line_error(invoke(*COMMANDS["run"](export_copy)), "disagrees with model.onnx on outputs")


def test_the_export_records_its_config_in_model_onnx(tiny_export: Path) -> None:
    proto = onnx.load(str(tiny_export / artifact.MODEL_FILE), load_external_data=False)
    recorded = json.loads({p.key: p.value for p in proto.metadata_props}[folder_check.CONFIG_METADATA])
    assert recorded == artifact.Manifest.read(tiny_export).config
    assert artifact.validate_folder(tiny_export, artifact.Manifest.read(tiny_export))


def test_manifest_needs_every_field_without_a_default() -> None:
    no_default = [n for n in field_names() if n not in defaults()]
    assert set(no_default) <= set(config_fields.MANIFEST_NEEDS) <= set(field_names())


@pytest.mark.parametrize("text", ["[" * 100000, '{"config": {"vocab_size": ' + "1" * 5000 + "}}"])
def test_hostile_manifest_json_is_one_line(export_copy: Path, text: str) -> None:
    (export_copy / artifact.MANIFEST).write_text(text)
    one_line_error(invoke(*COMMANDS["run"](export_copy)), "manifest.json is not valid JSON")
