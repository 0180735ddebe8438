"""Interoperation: loading trained networks, PyTorch weights both ways, the PyTorch references."""
