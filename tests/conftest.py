"""Shared test set-up.

Tests that take the ``xp`` fixture run twice: once with NumPy and once with CuPy under
the ``gpu`` marker; the CuPy run is skipped cleanly where no CUDA device is available.
Run only the GPU tests with ``pytest -m gpu``.
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import autograd  # noqa: E402

requires_cuda = pytest.mark.skipif(not autograd.cuda_available(),
                                   reason=f"needs CuPy and a CUDA device: {autograd.cuda_problem()}")


@pytest.fixture(params=[pytest.param("numpy"),
                        pytest.param("cupy", marks=[pytest.mark.gpu, requires_cuda])])
def xp(request):
    """The array module under test: numpy, or cupy on a GPU."""
    if request.param == "numpy":
        return np
    return autograd.cupy
