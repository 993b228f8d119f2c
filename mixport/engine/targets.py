"""Build targets and precisions: what each TensorRT flavor can be asked for.

TensorRT-RTX builds ahead of time without a GPU for listed compute
capabilities (``IBuilderConfig.num_compute_capabilities`` +
``set_compute_capability(ComputeCapability.SMxx, i)``); full TensorRT builds
for the local GPU ("current") or, with a hardware-compatibility level, for
every Ampere-or-newer GPU ("ampere+").
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from mixport.errors import BuildError
from mixport.plugins.trt_import import RTX, flavor_of

DTYPES = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}  # name -> TensorRT DataType
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16"}
CURRENT = "current"
AMPERE_PLUS = "ampere+"
_FULL_LEVELS = {CURRENT: "NONE", AMPERE_PLUS: "AMPERE_PLUS"}


def check_dtype(dtype: str) -> str:
    """``dtype`` normalized ("fp32", "fp16" or "bf16"); BuildError otherwise."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise BuildError("unsupported dtype", given=dtype, expected=", ".join(DTYPES),
                         hint="the engine's precision is the ONNX file's: export in that dtype")
    return name


def rtx_capabilities(trt: ModuleType) -> dict[str, Any]:
    """{"sm80": ComputeCapability.SM80, ...}: every SM target this RTX build knows."""
    members = trt.ComputeCapability.__members__
    return {name.lower(): value for name, value in members.items() if name.startswith("SM")}


def supported_targets(trt: ModuleType) -> list[str]:
    """Target names ``build_engine`` accepts with this TensorRT module."""
    if flavor_of(trt) == RTX:
        return [*rtx_capabilities(trt), AMPERE_PLUS, CURRENT]
    return list(_FULL_LEVELS)


def default_targets(trt: ModuleType) -> tuple[str, ...]:
    """RTX: every Ampere-or-newer SM (no GPU needed); full TensorRT: the local GPU."""
    return (AMPERE_PLUS,) if flavor_of(trt) == RTX else (CURRENT,)


def resolve_targets(trt: ModuleType, targets: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalize ``targets`` (names or a comma list) and check them; BuildError if unknown."""
    if targets is None:
        targets = default_targets(trt)
    if isinstance(targets, str):
        targets = targets.split(",")
    names = tuple(dict.fromkeys(t.strip().lower().replace("_", "") for t in targets if t.strip()))
    known = supported_targets(trt)
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise BuildError(f"unsupported build target for {trt.__name__}", given=list(targets),
                         expected=", ".join(known),
                         hint="full TensorRT builds for the local GPU ('current') or 'ampere+'; "
                              "TensorRT-RTX builds for named SMs without a GPU")
    if CURRENT in names and len(names) > 1:
        raise BuildError("'current' cannot be combined with other targets", given=list(names))
    return names


def _rtx_expand(trt: ModuleType, names: tuple[str, ...]) -> list[str]:
    caps = rtx_capabilities(trt)
    expanded: list[str] = []
    for name in names:
        if name == AMPERE_PLUS:
            expanded += [sm for sm in caps if int(sm[2:]) >= 80]
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def apply_targets(trt: ModuleType, config: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """Set ``names`` on a builder config; returns the concrete targets that were set."""
    if flavor_of(trt) != RTX:
        level = getattr(trt.HardwareCompatibilityLevel, _FULL_LEVELS[names[0]])
        config.hardware_compatibility_level = level
        return names
    if names == (CURRENT,):
        sms, caps = [CURRENT], {CURRENT: trt.ComputeCapability.CURRENT}
    else:
        sms, caps = _rtx_expand(trt, names), rtx_capabilities(trt)
    config.num_compute_capabilities = len(sms)
    for index, sm in enumerate(sms):
        if not config.set_compute_capability(caps[sm], index):
            raise BuildError("TensorRT-RTX rejected a compute capability", given=sm,
                             expected=", ".join(supported_targets(trt)))
    return tuple(sms)
