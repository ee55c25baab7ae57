"""Fused CuPy kernels for the Gaussian ops of gaussian.py (placeholder: filled in by the GPU work).

``active(array)`` says whether the fused path is taken for an array: only CuPy arrays,
and only while fusion is enabled (``set_fusion(False)`` compares with the plain path).
"""
from autograd import cupy

_fusion_enabled = True


def set_fusion(enabled):
    """Turn the fused GPU kernels on or off (the plain CuPy array code runs when off)."""
    global _fusion_enabled
    _fusion_enabled = bool(enabled)


def active(array):
    return _fusion_enabled and cupy is not None and isinstance(array, cupy.ndarray) and False
