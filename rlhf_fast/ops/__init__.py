"""Kernels: each module holds its Triton kernels, launchers, autograd Function and ``*_ref``."""
