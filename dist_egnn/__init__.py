"""dist-egnn: equivariant graph neural networks (EGNN, FastEGNN, DistEGNN) for large geometric graphs."""
__version__ = "0.1.0"
