"""Bad model folders: each gives one clear MixportError, never a traceback or a pickle load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixport.errors import CheckpointError, ConfigError
from mixport.exporter.checkpoint import INDEX, LazyWeight
from mixport.exporter.config import load_config
from mixport.exporter.loader import load_for_export, load_reference


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def test_missing_config_field(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_config(d, num_local_experts=None)
    with pytest.raises(ConfigError, match="lacks the field 'num_local_experts'"):
        load_config(d)


def test_unsupported_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConfigError, match="unsupported architecture.*LlamaForCausalLM.*MixtralForCausalLM"):
        load_config(d)
    _edit_config(d, architectures=["MixtralFineTuneForCausalLM"], model_type="mixtral")  # model_type decides
    assert load_config(d)[0].model_type == "mixtral"


def test_rope_scaling_refused(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_config(d, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ConfigError, match="rope"):
        load_config(d)


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    torch.save({"x": Boom()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights.*safe_serialization=True"):
        load_reference(d)
    assert not marker.exists()


def test_truncated_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_reference(d)


def test_header_truncated(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="header runs past the end"):
        load_reference(d)


def test_missing_and_misshapen_weights(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    d = _copy(tiny_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 weights missing.*experts.3.w2"):
        load_reference(d)
    state["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(3, 3)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_reference(d)


def test_sharded_checkpoint_matches_single_file(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    state = load_file(tiny_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, d / shard)
        weight_map.update({n: shard for n in part})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, _, _ = load_reference(tiny_dir)
    b, _, _ = load_reference(d)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards that are missing"):
        load_reference(d)


def test_transformers_v5_fused_expert_names(tiny_dir: Path, tmp_path: Path) -> None:
    """Folders saved with stacked expert tensors (mlp.experts.gate_up_proj) load the same."""
    from safetensors.torch import load_file

    state = load_file(tiny_dir / "model.safetensors")
    cfg, _ = load_config(tiny_dir)
    fused = {}
    for name, t in state.items():
        if ".experts." not in name:
            fused[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        e = range(cfg.num_local_experts)
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{p}.{j}.w1.weight"], state[f"{p}.{j}.w3.weight"]]) for j in e])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([state[f"{p}.{j}.w2.weight"] for j in e])
    d = tmp_path / "v5"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    save_file(fused, d / "model.safetensors")
    a, _, _ = load_reference(tiny_dir)
    b, _, _ = load_reference(d)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    # the export path reads the same tensors lazily (one at a time, slices of the stacked experts)
    for folder in (tiny_dir, d):
        _, weights, _, _ = load_for_export(folder, "fp16")
        assert all(isinstance(w, LazyWeight) for w in weights.values())
        for name, x in a.state_dict().items():
            if name in weights:
                got = weights[name].read()
                assert got.dtype == torch.float16 and torch.equal(got, x.to(torch.float16)), name


def test_tied_embeddings_share_one_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    """tie_word_embeddings without lm_head.weight in the file: the head reads the embedding, once."""
    from safetensors.torch import load_file

    d = _copy(tiny_dir, tmp_path / "tied")
    state = load_file(d / "model.safetensors")
    state.pop("lm_head.weight")
    save_file(state, d / "model.safetensors")
    _edit_config(d, tie_word_embeddings=True)
    model, _, _ = load_reference(d)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
