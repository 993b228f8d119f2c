"""Running an export folder: Session backends, the generation loop, ``load()``."""

from __future__ import annotations

from mixport.runtime.api import Pipeline, load
from mixport.runtime.sampling import SamplingConfig

__all__ = ["Pipeline", "SamplingConfig", "load"]
