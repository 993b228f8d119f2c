"""ONNX Runtime GenAI's model builder for a Mixtral folder: an int4 QMoE model for the CPU.

onnxruntime-genai 0.18's builder has no Mixtral entry (it builds Mistral, Phi-3.5-MoE, GPT-OSS,
Qwen3.5-MoE, ...). Mixtral is Mistral's decoder with a routed SwiGLU MoE in place of the MLP, so
this shim registers a Mistral builder whose MoE layers use the builder's own QMoE machinery: the
router MatMul, the experts' gate|up rows interleaved for ``swiglu_fusion=1`` and block-quantized by
the builder (``make_interleaved_swiglu_moe_preprocessing``, as its Qwen3.5-MoE does), softmax ->
top-k -> renormalize (``normalize_routing_weights=1``: Mixtral's routing), plain SwiGLU
(alpha 1, beta 0). Attention, norms and lm_head are the builder's Mistral path (int4 MatMulNBits).

    python tools/ortgenai_mixtral.py SRC OUT [--precision int4] [--ep cpu] [--extra k=v ...]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any


def mixtral_class() -> type:
    """The builder class (defined lazily: onnxruntime_genai and torch are heavy imports)."""
    from onnxruntime_genai.models.builders.mistral import MistralModel

    class MixtralQMoEModel(MistralModel):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, io_dtype: Any, onnx_dtype: Any, ep: str, cache_dir: str,
                     extra_options: dict[str, Any]) -> None:
            super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
            self.moe_attrs["activation_type"] = "swiglu"
            self.moe_attrs["swiglu_fusion"] = 1
            self.moe_attrs["normalize_routing_weights"] = True
            self.moe_intermediate_size = config.intermediate_size

        def get_moe_module(self, layer_id: int, layer: Any) -> Any:
            return layer.mlp  # transformers 5: MixtralSparseMoeBlock (gate, stacked experts)

        def make_moe_preprocessing(self, layer_id: int, moe: Any, root_input: str) -> None:
            self.make_interleaved_swiglu_moe_preprocessing(layer_id, moe)

        def make_moe_router(self, layer_id: int, moe: Any, root_input: str) -> None:
            base = f"/model/layers.{layer_id}/moe"
            matmul = self.make_matmul(moe.gate, f"{base}/router/MatMul", root_input)
            self.make_reshape(f"{base}/router/Reshape",
                              [f"{matmul}/output_0", f"/model/constants/INT64/{[-1, self.moe_attrs['num_experts']]}"],
                              dtype=self.io_dtype, shape=self.make_moe_router_shape())

        def make_moe_subgraph(self, layer_id: int, moe: Any, root_input: str, *_: Any) -> str:
            base = f"/model/layers.{layer_id}/moe"
            op_type = self.moe_attrs["op_type"]
            names = self.make_moe_expert_names(layer_id)
            name = f"{base}/{op_type}"
            quantized = op_type == "QMoE"
            self.make_moe_op(name, root_input=root_input, router_probs=f"{base}/router/Reshape/output_0",
                             weight1=names["gate_up_weight"], scales1=names["gate_up_scales"] if quantized else "",
                             bias1=names["gate_up_bias"], weight2=names["down_weight"],
                             scales2=names["down_scales"] if quantized else "", bias2=names["down_bias"],
                             global_scales1="", global_scales2="")
            self.layernorm_attrs["skip_input"] = f"{name}/output_0"
            return f"{name}/output_0"

    return MixtralQMoEModel


def build(src: str, out: str, precision: str = "int4", ep: str = "cpu", extra: list[str] | None = None) -> None:
    """Run the builder on SRC (a Mixtral HF folder) into OUT, with Mixtral routed to the class above."""
    from onnxruntime_genai.models import builder

    builder.MistralModel = mixtral_class()  # the dispatch below names MistralModel for Mistral's architecture
    cache = tempfile.mkdtemp(prefix="ortgenai-cache-")
    options = builder.parse_extra_options(None, src, out, precision, ep, cache, extra or [])
    config = options["hf_details"]["hf_config"]
    if config.architectures[0] != "MixtralForCausalLM":
        raise SystemExit(f"not a Mixtral folder: architectures {config.architectures}")
    config.architectures = ["MistralForCausalLM"]
    builder.create_model(None, src, out, precision, ep, cache, **options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--extra", nargs="*", default=[], help="builder extra options, key=value")
    args = ap.parse_args()
    build(args.src, args.out, args.precision, args.ep, args.extra)


if __name__ == "__main__":
    main()
