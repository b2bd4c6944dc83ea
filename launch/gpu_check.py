"""One-call GPU validation: ``python launch/gpu_check.py [--dry-run] [--out FILE] [--stages a,b]``.

Environment, CUDA vs CPU with the same weights, fused vs plain autograd, bf16, a speed table against the
authors' structure, and a DeepSpeed run with resume; the summary goes to ``docs/results/gpu-<date>.md``.
``--dry-run`` runs every stage on tiny sizes on the CPU. See ``dist_egnn.measure.gpu_check``.
"""
import sys

from dist_egnn.measure import gpu_check

if __name__ == "__main__":
    sys.exit(gpu_check.run(sys.argv[1:]))
