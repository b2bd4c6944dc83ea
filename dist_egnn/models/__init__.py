"""Equivariant models: the EGNN baseline and FastEGNN (docs/maths.md §2). Pure model maths: no collectives here."""
from dist_egnn.models.egnn import EGNN, EGNNLayer, GraphContext, Prediction
from dist_egnn.models.fastegnn import FastEGNN, FastEGNNLayer

__all__ = ["EGNN", "EGNNLayer", "FastEGNN", "FastEGNNLayer", "GraphContext", "Prediction"]
