"""The benchmark against PyTorch (the command line is pyramidnet_jax/benchmark.py)."""
