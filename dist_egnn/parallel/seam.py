"""The seam between the model and parallelism: what the model maths asks of its communicator.

The model asks two things of its communicator, once per layer:

* ``sum_over_parts(*per_graph_sums)``: the sum, over every process holding a part of the same graphs, of
  per-graph quantities. Dividing such sums of per-node values by the summed node counts gives exact
  node-count-weighted global means: FastEGNN needs them for the centroid (docs/maths.md §2 term 2), the
  virtual coordinate increment (term 5) and the mean real->virtual message (term 7).
* ``exchange_halo(*node_tensors)``: append, below the owned rows, the rows of the halo nodes (remote
  endpoints of cut edges) so that edges can read them (docs/maths.md §5, exact mode).
* ``start_sum`` / ``start_halo``: the same two, issued now and completed by the returned handle's ``wait()``
  (:class:`Handle`), used when the communicator's ``overlap`` is true: the model computes what needs no
  remote data (interior edges, FastEGNN's virtual terms) while the collective is in flight.

:class:`Communicator` is that contract. Two classes fulfil it: :class:`SingleProcess` here, where one
process holds whole graphs (the mean is a division, there is no halo), and
``dist_egnn.parallel.collectives.GraphParallel``, where the P ranks of a *graph group* each hold one part
of every graph. Either is injected into the model (``model.set_comm``), so the model code is the same for
1 and P ranks (docs/design.md §2). Both also carry what the trainer reads around them, ``stats`` (time and
bytes in collectives) and ``set_halo_plan``, so the trainer never asks which one it has.

This module never imports ``torch.distributed``: the model depends on it alone (a test checks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dist_egnn.partitioners.subgraphs import HaloPlan


@dataclass
class CommStats:
    """Wall time and bytes spent in the model's collectives (forward and backward), for step-time breakdowns."""

    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0

    @staticmethod
    def start(tensor: Tensor) -> float:
        """The clock before a collective on ``tensor``. On CUDA the queued work is waited for first, so the
        time counted is the collective's, not the kernels launched before it."""
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()

    def add(self, started: float, tensor: Tensor) -> None:
        """Count one collective on ``tensor`` begun at ``started`` (:meth:`start`); on CUDA after it finished."""
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        self.seconds += time.perf_counter() - started
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def reset(self) -> "CommStats":
        """Return the counts so far and start again from zero."""
        snapshot = CommStats(self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return snapshot


class Handle(Protocol):
    """A collective in flight: ``wait()`` completes it and returns its tensors (autograd-aware)."""

    def wait(self) -> tuple[Tensor, ...]: ...


class Ready:
    """A :class:`Handle` whose tensors were there at once (nothing to communicate)."""

    def __init__(self, tensors: tuple[Tensor, ...]):
        self.tensors = tensors

    def wait(self) -> tuple[Tensor, ...]:
        return self.tensors


class Communicator(Protocol):
    """What the model and the trainer need from parallelism; see the module docstring."""

    world_size: int
    stats: CommStats
    overlap: bool       # the model starts collectives early and computes in between (start_sum, start_halo)

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]: ...

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]: ...

    def start_sum(self, *tensors: Tensor) -> Handle:
        """``sum_over_parts`` issued now; ``wait()`` returns the sums."""

    def start_halo(self, *node_tensors: Tensor) -> Handle:
        """``exchange_halo`` issued now; ``wait()`` returns the halo rows alone, (R, W_k) for each input, not the
        owned rows again (the caller has them; copying them would cost a node tensor per layer)."""

    def set_halo_plan(self, plan: HaloPlan | None) -> None: ...


class SingleProcess:
    """No-op twin of ``GraphParallel``: whole graphs live in this process.

    It has the same methods and attributes, so code around the model treats both alike; here nothing is
    ever communicated, so ``stats`` stays at zero and a halo plan (there is none with whole graphs) must
    be ``None``.
    """

    world_size = 1
    overlap = False       # nothing is ever in flight

    def __init__(self):
        self.stats = CommStats()

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Sum each per-graph tensor over the processes that hold parts of the same graphs.

        Distributed: an autograd-aware all-reduce SUM. One process holds every part, so: identity.
        """
        return tensors

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]:
        """Owned rows followed by halo rows. One process owns every node and has no halo: identity."""
        return node_tensors

    def start_sum(self, *tensors: Tensor) -> Ready:
        """The sums (this process holds every part) at once."""
        return Ready(tensors)

    def start_halo(self, *node_tensors: Tensor) -> Ready:
        """No halo rows (zero rows of each input) at once."""
        return Ready(tuple(t[:0] for t in node_tensors))

    def set_halo_plan(self, plan: HaloPlan | None) -> None:
        """Whole graphs have no halo: only ``None`` makes sense here."""
        if plan is not None:
            raise ValueError("SingleProcess holds whole graphs and has no halo; a halo plan needs GraphParallel")
