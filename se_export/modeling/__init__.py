"""The routed sparse linear in PyTorch: the ``se::routed_sparse_matmul`` op (the golden reference) and its module."""
