"""Plugin tests: run Triton kernels in the CPU interpreter; register markers.

Triton decides interpreter vs compiled mode when ``triton.language`` is first
imported, so TRITON_INTERPRET is set here, at conftest import time, before any
test module imports triton. ``setdefault`` leaves an explicit choice alone
(e.g. TRITON_INTERPRET=0 on a GPU machine, where the kernel tests then need
CUDA tensors and skip). Compile tests run in subprocesses with the variable
removed, so they are unaffected.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 cores")
