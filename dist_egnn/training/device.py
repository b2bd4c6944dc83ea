"""Where a rank computes and in what precision: device choice, CUDA switches, honest timers and memory.

* :func:`resolve_device`: ``trainer.device=auto`` takes CUDA when a GPU is visible, else the CPU; rank r of a
  node takes ``cuda:(local_rank % visible GPUs)``, so a scheduler that shows each task one GPU
  (``CUDA_VISIBLE_DEVICES``) and a node whose ranks each see all of them both work. More ranks on a node
  than GPUs would share a GPU, which NCCL refuses: that is an error naming the fix, before any work.
* :func:`configure_cuda`: TF32 matrix products (``trainer.tf32``, on by default: float32 GEMMs on tensor
  cores, ~10-bit mantissa products with float32 accumulation) and deterministic kernels
  (``trainer.deterministic``).
* :func:`autocast`: ``trainer.precision=bf16`` runs the forward under ``torch.autocast`` in bfloat16; the
  model keeps positions, sums and outputs in float32 (``dist_egnn.models``), parameters and optimizer state
  stay float32.
* :func:`synchronize`, :func:`memory_mb`: CUDA work is asynchronous, so a host clock read around it measures
  the launch, not the work; and the caching allocator holds more than the tensors use.
"""
from __future__ import annotations

import contextlib
import resource

import torch

from dist_egnn.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def resolve_device(requested: str, local_rank: int = 0, local_world_size: int = 1,
                   backend: str = "auto") -> torch.device:
    """The device of this rank for ``trainer.device=requested``; raises ConfigError naming the fix."""
    kind = requested.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"trainer.device={requested!r}: choose auto, cpu or cuda")
    available = torch.cuda.is_available()
    if kind == "cpu" or (kind == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise ConfigError(f"trainer.device={requested} but no CUDA device is visible to this process "
                          f"(torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES, driver, or a CPU-only torch): "
                          f"use trainer.device=auto or trainer.device=cpu")
    count = torch.cuda.device_count()
    if local_world_size > count and backend != "gloo":
        raise ConfigError(f"{local_world_size} ranks on this node but {count} visible GPU(s): NCCL cannot share a GPU "
                          f"between ranks. Launch at most {count} rank(s) per node (deepspeed --num_gpus {count}, "
                          f"torchrun --nproc-per-node {count}), or trainer.device=cpu")
    return torch.device("cuda", local_rank % count)


def configure_cuda(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """Select the device and set the CUDA switches of this process (no-op on CPU but for determinism)."""
    # Deterministic kernels everywhere (index_add_ on CUDA uses atomics otherwise); an op without a
    # deterministic implementation then raises instead of silently varying. The configuration decides, both ways.
    torch.use_deterministic_algorithms(bool(deterministic))
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32) and not deterministic
    torch.backends.cudnn.allow_tf32 = bool(tf32) and not deterministic
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS's condition for reproducibility


def autocast(device: torch.device, precision: str):
    """The forward's precision context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for this device's queued work (CUDA), so that a host clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory of this rank in MiB: ``peak_mem_mb`` (CUDA allocator peak, or resident set size peak on
    CPU) and, on CUDA, ``peak_reserved_mb`` (what the caching allocator held at most)."""
    if device.type == "cuda":
        return dict(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                    peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
    return dict(peak_mem_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)    # Linux reports KiB


def edge_chunk_rows(requested, device: torch.device, hidden: int) -> int | None:
    """``model.edge_chunk_size`` as rows per chunk: a number as given; ``auto`` (or None, from older
    configurations): on CPU None (the fused blocks' default, sized for the last-level cache), on CUDA from
    the free memory: a quarter of it for a chunk's ~8 live (rows, H) float32 intermediates, between 16,384
    and 4,194,304 rows (large chunks keep a GPU busy; one launch per op per chunk)."""
    if requested not in (None, "auto"):
        return int(requested)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(max(16_384, min(4_194_304, free // 4 // (8 * hidden * 4))))
