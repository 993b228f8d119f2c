"""The Triton interpreter is scoped to the ``triton_interpret`` (CPU kernel) tests.

The ``gpu`` tests run in the pytest process itself; these tests show that this
process stays in compiled mode (``interpret_mode()`` False, kernels wrapped as
``JITFunction``) unless the user started pytest with TRITON_INTERPRET set,
before and after interpreted tests ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import require_module
from tests.plugins.conftest import USER_TRITON_INTERPRET

ROOT = Path(__file__).resolve().parents[2]

INTERPRETED = '''
import pytest
import torch

from mixport.plugins import kernels as K
from mixport.plugins.kernels._runtime import interpret_mode
from triton.runtime.interpreter import InterpretedFunction
from mixport.plugins.kernels.routing import topk_routing_kernel

pytestmark = pytest.mark.triton_interpret


def test_runs_in_the_interpreter():
    assert interpret_mode() and isinstance(topk_routing_kernel.wrapped, InterpretedFunction)
    _, ids = K.topk_routing(torch.tensor([[0.0, 2.0, 1.0]]), 1)
    assert ids.tolist() == [[1]]
'''

COMPILED = '''
import os

from triton.runtime.jit import JITFunction
from mixport.plugins.kernels._runtime import interpret_mode
from mixport.plugins.kernels.routing import topk_routing_kernel


def test_then_compiled_mode_as_the_gpu_tests_see_it():
    assert "TRITON_INTERPRET" not in os.environ and not interpret_mode()
    assert isinstance(topk_routing_kernel.wrapped, JITFunction)
'''


def _kernels() -> list:
    from mixport.plugins.kernels import align, grouped_gemm, routing

    return [routing.topk_routing_kernel, align.moe_align_kernel, grouped_gemm.gate_up_kernel,
            grouped_gemm.down_kernel, grouped_gemm.reduce_kernel]


def test_this_process_launches_compiled_kernels() -> None:
    """Nothing in the test setup sets TRITON_INTERPRET: the gpu tests here get compiled Triton."""
    require_module("triton")
    from triton.runtime.jit import JITFunction

    from mixport.plugins.kernels._runtime import interpret_mode

    assert os.environ.get("TRITON_INTERPRET") == USER_TRITON_INTERPRET
    if USER_TRITON_INTERPRET is None:
        assert not interpret_mode()
        assert all(isinstance(kernel.wrapped, JITFunction) for kernel in _kernels())


def test_interpreted_tests_leave_the_session_compiled(tmp_path: Path) -> None:
    """A session with an interpreted test (first) and a plain one (after it), under this folder's conftest."""
    require_module("triton")
    (tmp_path / "conftest.py").write_text("from tests.plugins.conftest import *  # noqa: F403\n")
    (tmp_path / "test_a_interpreted.py").write_text(textwrap.dedent(INTERPRETED))
    (tmp_path / "test_b_compiled.py").write_text(textwrap.dedent(COMPILED))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
