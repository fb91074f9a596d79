"""Triton kernels for block attention (imported as ``sptutor.kernels``)."""
