"""Parallelism in one package: the seam the model sees, the collectives behind it, the process runtime.

* :mod:`~dist_egnn.parallel.seam`: the :class:`Communicator` contract and its single-process twin
  :class:`SingleProcess` (no ``torch.distributed``: the model imports only this).
* :mod:`~dist_egnn.parallel.collectives`: the autograd-aware all-reduce and halo exchange, and
  ``GraphParallel``, the communicator of one rank of a graph group.
* :mod:`~dist_egnn.parallel.runtime`: the launcher's environment, process groups, barriers, agreements.

The halo plan (who sends which rows to whom) is built with the subgraphs, in
``dist_egnn.partitioners.subgraphs``.
"""
from dist_egnn.parallel.seam import CommStats, Communicator, SingleProcess

__all__ = ["CommStats", "Communicator", "SingleProcess"]
