"""Pallas kernels, installed as ``lte_jax.kernels`` (see setup.cfg package_dir).

Each op gets a folder with its GPU (Triton-lowered) and TPU (Mosaic) kernels;
the public entry points stay in ``lte_jax.ops`` and select a kernel through
their ``implementation=`` argument.
"""
