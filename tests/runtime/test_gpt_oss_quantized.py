"""GPT-OSS quantized (int4 experts, float biases: MoE plugin_version "3"): the portable model.onnx,
the fast graph (com.microsoft.QMoE with fc1/fc2 biases and the clamped SwiGLU) and its exact-level
twin agree, and the quantized folder passes `mixport check`."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from mixport import artifact, ops
from mixport.exporter.export import export
from mixport.exporter.tiny import write_tiny
from mixport.quant import QuantOptions, Scheme
from mixport.runtime import ort_graph
from mixport.runtime.ort_fast import OrtFastSession
from mixport.runtime.ort_session import OrtSession
from tests.conftest import tiny_config
from tests.exporter.parity import SessionStepper, greedy, left_padded_prompt, max_logit_error
from tests.helpers import require_module

require_module("transformers")

CFG = replace(tiny_config(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          sliding_layers=(0,), swiglu_limit=1.5), model_type="gpt_oss")
EXACT = 1  # accuracy level with fp32 activations


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpt-oss-int4")
    out = root / "q"
    export(write_tiny(root / "src", CFG, seed=2), out, quantize=QuantOptions(Scheme(4, 16)))
    return out


def test_quantized_moe_nodes_keep_float_biases(folder: Path) -> None:
    proto = onnx.load(str(folder / artifact.MODEL_FILE), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    moes = [n for n in proto.graph.node if (n.domain, n.op_type) == (ops.DOMAIN, ops.MOE)]
    assert len(moes) == CFG.num_hidden_layers
    for node in moes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] == ops.BIAS_PLUGIN_VERSION.encode() and attrs["bits"] == 4
        assert len(node.input) == len(ops.MOE_INPUTS) + len(ops.QUANT_INPUTS) + len(ops.BIAS_INPUTS)
        assert inits[node.input[3]].data_type == onnx.TensorProto.INT4
        assert [inits[n].data_type for n in node.input[-2:]] == [onnx.TensorProto.FLOAT] * 2


def test_fast_graph_with_qmoe_equals_the_portable_model(folder: Path, tmp_path: Path) -> None:
    work = Path(shutil.copytree(folder, tmp_path / "q"))
    manifest = artifact.Manifest.read(work)
    vocab = manifest.config["vocab_size"]
    ids, mask = left_padded_prompt(vocab)
    want = greedy(SessionStepper(OrtSession(work / artifact.MODEL_FILE, manifest, threads=1, accuracy_level=EXACT)),
                  ids, mask, 6)
    exact = work / "exact.ort.onnx"
    proto = ort_graph.build(ort_graph.export_weights(work / artifact.MODEL_FILE, manifest.config), manifest.config,
                            manifest.dtype, share=True, accuracy_level=EXACT)
    qmoe = [n for n in proto.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == CFG.num_hidden_layers and all(n.input[4] and n.input[7] for n in qmoe)  # fc1/fc2 biases
    ort_graph._save(proto, exact)
    got = greedy(SessionStepper(OrtFastSession(exact, manifest, threads=1, accuracy_level=EXACT)), ids, mask, 6)
    assert np.array_equal(got.tokens, want.tokens)
    assert max_logit_error(got, want, mask) <= 1e-4
