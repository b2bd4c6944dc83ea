"""Scaling study: step time and memory per rank of DistEGNN training for a list of P, both halo modes.

    python launch/scaling.py                                   # synthetic113k, P = 1, 2, 4, 8, METIS
    python launch/scaling.py data=fluid_small parts=[1,2,4] halo=[exact] partition=spatial

Real multi-rank runs where the machine has the cores, per-part projections beyond; writes
``docs/results/<name>.{csv,md,png}``. See ``dist_egnn.measure.scaling_study``.
"""
from __future__ import annotations

import sys

from dist_egnn.measure import scaling_study

if __name__ == "__main__":
    scaling_study.run(sys.argv[1:])
