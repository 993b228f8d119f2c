"""The architecture seam: the registry finds a family's adapter, and each adapter's declarations
(config mapping, checkpoint names, module paths) agree with the reference model and transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mixport.errors import ConfigError
from mixport.exporter.loader import build_model, expected_shapes
from mixport.models import registry
from mixport.models.adapter import Adapter, take
from tests.conftest import tiny_config

ADAPTERS = [pytest.param(a, id=a.model_type) for a in registry.ADAPTERS]


def _tiny(adapter: Adapter):  # -> MoEConfig of the family: odd sizes, more than one layer
    return adapter.conform(tiny_config(hidden_size=72, head_dim=18, intermediate_size=40, num_local_experts=5,
                                       shared_expert_intermediate_size=24))


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, mixport.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_architecture_is_one_line_naming_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as info:
        registry.find({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    text = str(info.value)
    assert "\n" not in text and "unsupported architecture" in text and "LlamaForCausalLM" in text
    for adapter in registry.ADAPTERS:
        assert adapter.name in text and adapter.model_type in text
    with pytest.raises(ConfigError, match="unsupported architecture"):
        registry.find({})
    with pytest.raises(ConfigError, match="unsupported model_type.*MixtralForCausalLM"):
        registry.get("llama")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_found_by_architecture_or_by_model_type(adapter: Adapter) -> None:
    assert registry.find({"architectures": [adapter.name]}) is adapter
    assert registry.find({"architectures": ["SomeFineTuneForCausalLM"], "model_type": adapter.model_type}) is adapter
    assert registry.find({"model_type": adapter.model_type}) is adapter
    assert registry.get(adapter.model_type) is adapter
    assert registry.for_config({"model_type": adapter.model_type}) is adapter


def test_a_config_without_model_type_is_mixtral() -> None:
    """Manifests written before the adapters have no model_type: they hold Mixtral exports."""
    assert registry.get(None).model_type == "mixtral"
    assert registry.for_config({"hidden_size": 64}).model_type == "mixtral"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_config_round_trips_through_config_json(adapter: Adapter) -> None:
    cfg = _tiny(adapter)
    raw = adapter.to_hf_dict(cfg)
    assert registry.find(raw) is adapter
    assert adapter.config_from_hf(raw) == cfg


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_config_errors_name_the_config_json_field(adapter: Adapter) -> None:
    raw = adapter.to_hf_dict(_tiny(adapter))
    key = adapter.hf_key("num_experts_per_tok")
    with pytest.raises(ConfigError, match=f"lacks the field '{key}'"):
        adapter.config_from_hf({k: v for k, v in raw.items() if k != key})
    with pytest.raises(ConfigError, match=f"'{key}' must be a positive integer"):
        adapter.config_from_hf({**raw, key: 0})
    with pytest.raises(ConfigError, match="exceeds"):
        adapter.config_from_hf({**raw, key: raw[adapter.hf_key("num_local_experts")] + 1})


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_hub_names_round_trip(adapter: Adapter) -> None:
    """Every reference weight, written under its hub name (as the tiny writer does), reads back
    as itself, whole."""
    for name, shape in expected_shapes(_tiny(adapter)).items():
        hub = adapter.hub_name(name)
        assert list(adapter.checkpoint_names(hub, tuple(shape))) == [(name, tuple(shape), ())], hub


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_declared_paths_exist_in_the_reference_model(adapter: Adapter) -> None:
    """The router / expert paths the tools and the fast graph use name real modules and weights."""
    cfg = _tiny(adapter)
    shapes = expected_shapes(cfg)
    with torch.device("meta"):
        model = adapter.reference_model(cfg)
    assert adapter.moe_layers(cfg)
    for i in adapter.moe_layers(cfg):
        assert hasattr(model.get_submodule(f"layers.{i}.{adapter.router_path}"), "logits")
        assert shapes[adapter.router_weight(i)] == (cfg.num_local_experts, cfg.hidden_size)
        for e in range(cfg.num_local_experts):
            assert shapes[adapter.expert_weight(i, e, "gate")] == (cfg.intermediate_size, cfg.hidden_size)
            assert shapes[adapter.expert_weight(i, e, "up")] == (cfg.intermediate_size, cfg.hidden_size)
            assert shapes[adapter.expert_weight(i, e, "down")] == (cfg.hidden_size, cfg.intermediate_size)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_transformers_names_map_onto_the_reference(adapter: Adapter) -> None:
    """transformers' own model (its in-memory names: transformers 5 stacks the experts) renamed by
    the adapter is exactly the reference's state dict, and computes the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = _tiny(adapter)
    raw = adapter.to_hf_dict(cfg)
    hf_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    hf = adapter.transformers_class()(hf_config).eval()
    state = {}
    for hf_name, tensor in hf.state_dict().items():
        for name, shape, index in adapter.checkpoint_names(hf_name, tuple(tensor.shape)):
            part = take(tensor, index)
            assert tuple(part.shape) == shape, name
            assert name not in state, f"{name} twice"
            state[name] = part.contiguous()
    expected = expected_shapes(cfg)
    assert sorted(state) == sorted(expected)
    ref = build_model(cfg, state)
    ids = torch.randint(3, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    mask, pos = torch.ones_like(ids), torch.arange(7)[None]
    with torch.no_grad():
        ours, _ = ref(ids, mask, pos, ref.empty_past(1))
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (ours - theirs).abs().max() <= 1e-5
