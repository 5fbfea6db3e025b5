"""Pure PyTorch/NumPy parts of the platform: structures, post-processing, evaluation.

Nothing in this package imports Ray or performs I/O beyond what its caller hands it.
"""
