"""Triton kernels (GPU; CPU only under ``TRITON_INTERPRET=1``)."""
