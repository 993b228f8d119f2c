"""TopKRouting plugin versions as `mixport build` reads them: a node's inputs and attributes say which
creator computes it; a node claiming version "1"/"2" with version-3 features is refused by name."""

from __future__ import annotations

import pytest
from onnx import helper

from mixport import ops
from mixport.engine.network import check_plugin_version, plugin_version_of
from mixport.errors import BuildError


def _node(inputs: list[str], **attrs: object):
    return helper.make_node(ops.TOPK_ROUTING, inputs, ["w", "ids"], domain=ops.DOMAIN, name="router", k=2,
                            num_experts=8, **attrs)


def test_version_read_from_inputs_and_attributes() -> None:
    assert plugin_version_of(_node(["logits"], normalization="none")) == "1"
    assert plugin_version_of(_node(["logits"], order="softmax_topk")) == "2"
    assert plugin_version_of(_node(["logits", "bias"], order="softmax_topk")) == "3"
    assert plugin_version_of(_node(["logits"], scoring_func="sparsemixer", order="softmax_topk")) == "3"
    assert plugin_version_of(_node(["logits"], n_group=4, topk_group=2)) == "3"
    check_plugin_version(_node(["logits", "bias"], scoring_func="sigmoid", plugin_version="3"))


@pytest.mark.parametrize("node", [
    _node(["logits", "bias"], plugin_version="2"),
    _node(["logits"], scoring_func="sigmoid", order="softmax_topk", plugin_version="2"),
    _node(["logits"], routed_scaling_factor=2.5, plugin_version="1"),
])
def test_old_version_with_new_features_is_refused(node) -> None:  # noqa: ANN001
    with pytest.raises(BuildError, match="which has no selection bias, sigmoid / sparsemixer scoring"):
        check_plugin_version(node)
