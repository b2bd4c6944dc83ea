"""split_graph: the contract between partitioning and distributed training, checked as properties.

Every test loops over graphs (symmetric radius graph, one-directional capped graph, complete graph),
assignments from every strategy and several P, and both halo modes.
"""
import numpy as np
import pytest

from dist_egnn.datasets.graphs import complete_graph, radius_graph
from dist_egnn.partitioners import METHODS, partition, partition_metrics, split_graph


def cases():
    rng = np.random.default_rng(0)
    cloud = rng.uniform(size=(400, 3))
    graphs = {"radius": radius_graph(cloud, 0.18), "capped": radius_graph(cloud, 0.25, max_neighbors=5),
              "complete": complete_graph(30)}
    for name, edge_index in graphs.items():
        pos = cloud if name != "complete" else rng.normal(size=(30, 3))
        for method in METHODS:
            for parts in (1, 2, 3, 8):
                assignment = partition(pos, parts, method, edge_index=edge_index, seed=parts).assignment
                for halo in (True, False):
                    yield f"{name}-{method}-P{parts}-{'halo' if halo else 'drop'}", edge_index, assignment, parts, halo


CASES = list(cases())


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES], scope="module")
def case(request):
    _, edge_index, assignment, parts, halo = request.param
    return edge_index, assignment, parts, halo, split_graph(edge_index, assignment, parts, halo)


def test_every_node_is_owned_exactly_once(case):
    edge_index, assignment, parts, halo, graphs = case
    owned = np.concatenate([g.owned for g in graphs])
    assert np.array_equal(np.sort(owned), np.arange(len(assignment)))
    for g in graphs:
        assert np.all(np.diff(g.owned) > 0) and np.all(assignment[g.owned] == g.part) and g.num_owned > 0


def test_local_edges_map_back_to_the_global_edges(case):
    edge_index, assignment, parts, halo, graphs = case
    for g in graphs:
        assert np.all(g.edge_index[0] < g.num_owned)                 # receivers are owned
        assert np.array_equal(g.local_to_global[g.edge_index], edge_index[:, g.edge_ids])
        rows = np.arange(g.num_owned + g.num_halo)
        assert np.array_equal(g.global_to_local(g.local_to_global), rows)


def test_halo_is_complete_and_minimal(case):
    edge_index, assignment, parts, halo, graphs = case
    for g in graphs:
        senders = g.edge_index[1]
        assert np.all(senders < g.num_owned + g.num_halo)            # every sender is owned or in the halo
        assert np.array_equal(np.unique(senders[g.cut_edge_mask]), np.arange(g.num_owned, g.num_owned + g.num_halo))
        assert np.all(g.halo_owner != g.part) and np.array_equal(g.halo_owner, assignment[g.halo])
        assert np.all(np.diff(g.halo_owner * len(assignment) + g.halo) > 0)   # ordered by (owner, global id)
    metrics = partition_metrics(edge_index, assignment, parts)
    if halo:
        assert [g.num_halo for g in graphs] == metrics.halo_sizes.tolist()
        assert sum(int(g.cut_edge_mask.sum()) for g in graphs) == metrics.cut_edges


def test_edges_are_kept_once_in_exact_mode_and_only_internal_ones_in_drop_mode(case):
    edge_index, assignment, parts, halo, graphs = case
    kept = np.sort(np.concatenate([g.edge_ids for g in graphs]))
    internal = np.flatnonzero(assignment[edge_index[0]] == assignment[edge_index[1]])
    assert np.array_equal(kept, np.arange(edge_index.shape[1]) if halo else internal)
    if not halo:
        assert all(g.num_halo == 0 and not g.send for g in graphs)


def test_send_lists_match_the_receivers_halo_blocks(case):
    edge_index, assignment, parts, halo, graphs = case
    for q, receiver in enumerate(graphs):
        for p, sender in enumerate(graphs):
            block = receiver.halo[receiver.halo_owner == p]
            sent = sender.local_to_global[sender.send.get(q, np.zeros(0, np.int64))]
            assert np.array_equal(sent, block) and np.all(sender.send.get(q, np.zeros(0, int)) < sender.num_owned)
            assert sender.send_counts()[q] == receiver.halo_counts()[p]


def test_one_round_of_message_passing_over_parts_equals_the_whole_graph(case):
    """Exact mode: owned rows + halo rows delivered by the send lists aggregate what one device does."""
    edge_index, assignment, parts, halo, graphs = case
    h = np.random.default_rng(1).normal(size=(len(assignment), 4))
    keep = np.ones(edge_index.shape[1], bool) if halo else assignment[edge_index[0]] == assignment[edge_index[1]]
    whole = np.zeros_like(h)
    np.add.at(whole, edge_index[0, keep], h[edge_index[1, keep]] * 2.0)
    for q, g in enumerate(graphs):
        received = [graphs[p].send[q] for p in np.unique(g.halo_owner)]    # all-to-all: blocks in owner order
        local_h = np.concatenate([h[g.owned]] + [h[graphs[p].owned[rows]] for p, rows in
                                                 zip(np.unique(g.halo_owner), received)])
        out = np.zeros((g.num_owned, 4))
        np.add.at(out, g.edge_index[0], local_h[g.edge_index[1]] * 2.0)
        assert np.allclose(out, whole[g.owned])


def test_docstring_example_path_graph():
    edge_index = np.array([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    first, second = split_graph(edge_index, np.array([0, 0, 1, 1]), 2, halo=True)
    assert first.owned.tolist() == [0, 1] and first.halo.tolist() == [2] and second.halo.tolist() == [1]
    assert first.send[1].tolist() == [1] and second.send[0].tolist() == [0]
    assert first.global_to_local([2, 3, 0]).tolist() == [2, -1, 0]


def test_empty_part_is_refused_with_its_number():
    with pytest.raises(ValueError, match=r"parts \[1\] of 3 are empty"):
        split_graph(np.array([[0, 1], [1, 0]]), np.array([0, 2]), 3, halo=True)
