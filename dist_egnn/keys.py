"""Glossary: the names and shapes used everywhere in dist-egnn.

Written once here so every module means the same thing by the same word.

Nodes and graphs
    pos            (N, 3)    real-node positions. Never called ``x``.
    vel            (N, 3)    real-node velocities (rotate with the frame, do not translate).
    node_features  (N, F)    invariant input features f_i (e.g. |v|, charge).
    node_attr      (N, A)    optional invariant attributes a_i fed to every layer (A may be 0).
    h              (N, H)    hidden invariant node features.
    batch          (N,)      graph id of every real node, in [0, B).
    num_graphs     B         graphs in a batch.

Edges
    edge_index     (2, E)    ``edge_index[0]`` is the RECEIVER i, ``edge_index[1]`` the SENDER j:
                             message m_ij flows j -> i and is aggregated at i. Radius graphs hold both
                             directions of every pair.
    edge_attr      (E, D)    invariant edge attributes e_ij.

Virtual nodes (FastEGNN), C per graph
    virtual_pos    (B, 3, C) virtual coordinates Z.
    virtual_h      (B, H, C) virtual features S.

Id spaces (distributed)
    global id      a node's index in the whole graph (one sample of the dataset).
    local id       its row on the rank that owns it; owned rows come first.
    halo id        rows after the owned ones: copies of nodes owned by another rank, refreshed every layer.
"""

POS = "pos"
VEL = "vel"
TARGET = "target"
NODE_FEATURES = "node_features"
NODE_ATTR = "node_attr"
EDGE_INDEX = "edge_index"
EDGE_ATTR = "edge_attr"
BATCH = "batch"
VIRTUAL_POS = "virtual_pos"
VIRTUAL_H = "virtual_h"

RECEIVER = 0
"""Row of ``edge_index`` that receives (aggregates) the message."""
SENDER = 1
"""Row of ``edge_index`` that sends the message."""

SPLITS = ("train", "val", "test")
