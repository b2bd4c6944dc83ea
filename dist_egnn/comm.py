"""Communication seam between the model maths and the world outside this process's rows.

The model asks two things of it, once per layer:

* ``sum_over_parts(*per_graph_sums)``: the sum, over every process holding a part of the same graphs, of
  per-graph quantities. Dividing such sums of per-node values by the summed node counts gives exact
  node-count-weighted global means: FastEGNN needs them for the centroid (SPEC §2 term 2), the virtual
  coordinate increment (term 5) and the mean real->virtual message (term 7).
* ``exchange_halo(*node_tensors)``: append, below the owned rows, the rows of the halo nodes (remote
  endpoints of cut edges) so that edges can read them (SPEC §5, exact mode).

``SingleProcess`` is the default: one process holds whole graphs, the mean is a division and there is no
halo. The distributed communicators live in this module too (DESIGN §2: the only place that calls
collectives for model maths), so the model code is the same for 1 and P ranks.
"""
from __future__ import annotations

from torch import Tensor


class SingleProcess:
    """No-op twin of the distributed communicators: whole graphs live in this process."""

    world_size = 1

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Sum each per-graph tensor over the processes that hold parts of the same graphs.

        Distributed: an autograd-aware all-reduce SUM. One process holds every part, so: identity.
        """
        return tensors

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]:
        """Owned rows followed by halo rows. One process owns every node and has no halo: identity."""
        return node_tensors
