"""Model families: the generic config, one adapter per family, the registry (no torch here).

``mixport.models.components`` (torch) holds the shared reference modules the adapters
compose. Layering: core < models < passes < exporter < ...
"""

from __future__ import annotations

from mixport.models.adapter import Adapter
from mixport.models.config import MoEConfig
from mixport.models.registry import ADAPTERS, find, for_config, get, lookup, supported

__all__ = ["ADAPTERS", "Adapter", "MoEConfig", "find", "for_config", "get", "lookup", "supported"]
