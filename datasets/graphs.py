"""Graphs over one scene's nodes: complete and radius graphs, edge dropping, invariant feature recipes.

All functions work on one graph in NumPy; ``edge_index[0]`` receives and ``edge_index[1]`` sends (see
``dist_egnn.keys``). Every graph here holds both directions of each pair.

Walls (node scalar ``type`` = 1, ``walls`` (n,) bool below): no edge joins two walls. Walls never move and the
model's update of a wall is discarded, so a wall -> wall message can only change a wall's features, never a
prediction that is scored, yet in the SPH boxes such edges were 91 % of the graph (docs/maths.md §8). Edges
between a wall and a moving node are kept in both directions. Every graph that is trained on, partitioned
or rolled out is built by :func:`graph_edges`, so partitions and halos see the same edge set as the model.

Nearest walls (``dataset.wall_neighbors`` = k > 0): every moving node also receives from its k nearest walls
however far they are (one direction, wall -> moving). Over a task step a particle can travel many radii (20
SPH frames: ~1 m against a 0.075 m radius), so the radius graph alone cannot show it the floor it is about to
hit. The choice depends on distances only and the message carries x_i - x_w: invariant and equivariant like
every other edge. A partition built on this graph puts those walls in the halo, so exact mode still equals one
device; in drop mode every part is a graph of its own (:func:`part_graphs`): a node's nearest walls are the
nearest in its part, which is what a rank holding only that part computes.

Their reach (``dataset.wall_neighbors_reach`` = R, store length units; default None: any length): only nearest
walls within R of the moving node are wired. A particle flung far out of the box at the impact of a rollout is
otherwise still wired to its nearest walls tens of radii away, a distance no training graph held; its messages
grow until it diverges and the virtual nodes carry its NaN to the whole scene (docs/results/README.md "Without
those edges..."). Set R just above the longest such edge in training and a stray particle falls freely instead.

Unwired walls (``dataset.unwired_walls=drop``; default ``keep``): a wall that no edge of a step's graph touches
sends no message, receives none, and is never moved or scored; it only costs its rows of the node updates and,
with ``model.virtual_walls`` true, a share of the virtual nodes' means. :func:`wired_nodes` names the nodes a step
keeps (every moving node, every wall an edge touches) and :func:`renumber` moves the edges onto them. With
``model.virtual_walls=false`` the moving nodes' predictions are then the same as with every wall (tested); with
walls in the virtual exchange the virtual nodes hear the walls near the fluid only, as the store's
``dataset.sph.wall_reach`` already does per scene.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from dist_egnn.errors import BadInput, ConfigError

NODE_FEATURE_RECIPES = ("speed",)        # plus any name in the store's node_scalars
# plus "<scalar>_product" for a node scalar
EDGE_FEATURE_RECIPES = ("distance", "distance_sq", "distance_per_radius", "radial_velocity", "height_per_radius")
VELOCITY_EDGE_FEATURES = ("radial_velocity",)   # read the input velocities: a rank's halo must carry them
RADIUS_EDGE_FEATURES = ("distance_per_radius", "height_per_radius")   # need the graph's radius
FIELD_EDGE_FEATURES = ("height_per_radius",)    # need the external field's direction (dataset.gravity)


def complete_graph(num_nodes: int) -> np.ndarray:
    """All ordered pairs i != j: (2, n(n-1)) int64."""
    recv, send = np.nonzero(~np.eye(num_nodes, dtype=bool))
    return np.stack([recv, send]).astype(np.int64)


def graph_edges(pos: np.ndarray, radius: float | None, max_neighbors: int | None = None,
                walls: np.ndarray | None = None, wall_neighbors: int = 0,
                wall_reach: float | None = None) -> np.ndarray:
    """The graph every consumer builds: the radius graph (:func:`radius_graph`), or the complete graph when
    ``radius`` is None, without wall -> wall edges, plus, with ``wall_neighbors`` = k > 0, the edges from
    every moving node's k nearest walls (within ``wall_reach``, if given) that it lacks
    (:func:`nearest_wall_edges`): (2, E) int64."""
    if radius is not None:
        edge_index = radius_graph(pos, radius, max_neighbors, walls)
    else:
        edge_index = complete_graph(len(pos))
        if walls is not None:
            edge_index = edge_index[:, ~(walls[edge_index[0]] & walls[edge_index[1]])]
    if wall_neighbors > 0 and walls is not None:
        extra = nearest_wall_edges(pos, walls, wall_neighbors, wall_reach)
        n = len(pos)
        have = np.isin(extra[0] * n + extra[1], edge_index[0] * n + edge_index[1])
        edge_index = np.concatenate([edge_index, extra[:, ~have]], axis=1)
    return edge_index


def wired_nodes(edge_index: np.ndarray, walls: np.ndarray | None) -> np.ndarray | None:
    """The nodes of a graph that a step needs: every moving node and every wall some edge of ``edge_index``
    touches, as sorted ids (n',) int64; None when that is every node (no walls, or each one wired)."""
    if walls is None:
        return None
    keep = ~np.asarray(walls, dtype=bool)
    keep[edge_index.reshape(-1)] = True
    return None if keep.all() else np.flatnonzero(keep)


def drop_unwired_walls(edge_index: np.ndarray, walls: np.ndarray | None,
                       *rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]:
    """A graph without the walls none of its edges touches: ``(edge_index, kept, rows)`` with the edges renumbered
    onto the nodes ``kept`` (:func:`wired_nodes`) and each of ``rows`` (per-node arrays) cut to them; unchanged,
    with ``kept`` None, when every node is needed."""
    kept = wired_nodes(edge_index, walls)
    if kept is None:
        return edge_index, None, rows
    return renumber(edge_index, kept, len(walls)), kept, tuple(r[kept] for r in rows)


def renumber(edge_index: np.ndarray, kept: np.ndarray, num_nodes: int) -> np.ndarray:
    """``edge_index`` over ``num_nodes`` nodes moved onto the nodes ``kept`` (sorted ids, every endpoint among
    them): node ``kept[i]`` becomes ``i``."""
    new_id = np.full(num_nodes, -1, np.int64)
    new_id[kept] = np.arange(len(kept))
    moved = new_id[edge_index]
    if moved.size and moved.min() < 0:
        raise ValueError("renumber: an edge touches a node that is not kept")
    return moved


def nearest_wall_edges(pos: np.ndarray, walls: np.ndarray, k: int, reach: float | None = None) -> np.ndarray:
    """(2, ≤ M·k) edges moving node <- each of its k nearest walls (fewer walls than k: all of them), every
    receiver's in order of distance; ``reach``: only walls at most that far (a node farther from every wall
    receives none); none without walls or moving nodes."""
    walls = np.asarray(walls, dtype=bool)
    moving, wall = np.flatnonzero(~walls), np.flatnonzero(walls)
    k = min(int(k), len(wall))
    if k == 0 or not len(moving):
        return np.zeros((2, 0), np.int64)
    bound = np.inf if reach is None else np.nextafter(float(reach), np.inf)   # query keeps distances < bound
    _, nearest = cKDTree(pos[wall]).query(pos[moving], k=k, distance_upper_bound=bound)
    nearest = np.asarray(nearest).reshape(len(moving), k)
    found = nearest < len(wall)                       # a wall beyond the reach comes back as index len(wall)
    receivers = np.repeat(moving, k).reshape(len(moving), k)
    return np.stack([receivers[found], wall[nearest[found]]]).astype(np.int64)


def part_graphs(pos: np.ndarray, assignment: np.ndarray, num_parts: int, radius: float | None,
                max_neighbors: int | None = None, walls: np.ndarray | None = None,
                wall_neighbors: int = 0, wall_reach: float | None = None) -> list[np.ndarray]:
    """Drop mode's graphs: each part's own :func:`graph_edges`, in global ids, one (2, E_p) array per part."""
    graphs = []
    for p in range(num_parts):
        ids = np.flatnonzero(assignment == p)
        local = graph_edges(pos[ids], radius, max_neighbors, None if walls is None else walls[ids], wall_neighbors,
                            wall_reach)
        graphs.append(ids[local])
    return graphs


def radius_graph(pos: np.ndarray, radius: float, max_neighbors: int | None = None,
                 walls: np.ndarray | None = None) -> np.ndarray:
    """Pairs closer than ``radius`` (both directions), via scipy's cKDTree: (2, E) int64.

    ``walls`` (n,) bool: pairs of two walls are left out (module docstring). They are never searched for:
    one tree over the moving nodes finds the moving-moving pairs and, against a tree over the walls, the
    moving-wall pairs (in the SPH boxes the walls are up to 25x the fluid). ``max_neighbors`` keeps, for
    every receiver, only its nearest ``max_neighbors`` senders among the edges left (the graph may then hold
    one direction of a pair but not the other; at a tie at the cap's distance either sender may be kept).
    With the cap, every receiver asks the trees for its nearest senders only (:func:`_capped_radius_graph`),
    so memory stays O(n · max_neighbors) however tightly the nodes pile together (a diverging rollout).
    """
    if not np.all(np.isfinite(pos)):
        raise BadInput("radius_graph: positions contain NaN or Inf")
    if max_neighbors is not None:
        return _capped_radius_graph(pos, radius, int(max_neighbors), walls)
    if walls is None or not np.any(walls):
        pairs = cKDTree(pos).query_pairs(radius, output_type="ndarray")
    else:
        pairs = _pairs_without_walls(pos, radius, np.asarray(walls, dtype=bool))
    return np.concatenate([pairs.T, pairs.T[::-1]], axis=1).astype(np.int64)


def _pairs_without_walls(pos: np.ndarray, radius: float, walls: np.ndarray) -> np.ndarray:
    """(K, 2) node pairs within ``radius`` with at least one end not a wall, each pair once."""
    moving, wall = np.flatnonzero(~walls), np.flatnonzero(walls)
    if not len(moving):
        return np.zeros((0, 2), np.int64)
    tree = cKDTree(pos[moving])
    inner = moving[tree.query_pairs(radius, output_type="ndarray")].reshape(-1, 2)
    near = tree.sparse_distance_matrix(cKDTree(pos[wall]), radius, output_type="ndarray")
    return np.concatenate([inner, np.stack([moving[near["i"]], wall[near["j"]]], axis=1)])


def _capped_radius_graph(pos: np.ndarray, radius: float, k: int, walls: np.ndarray | None) -> np.ndarray:
    """The radius graph with at most ``k`` senders per receiver, its nearest: (2, E) int64, by receiver and
    then distance. Each receiver asks the tree over the moving nodes for its k (+ itself) nearest, a moving
    receiver also the tree over the walls for its k nearest; of those within ``radius`` the nearest k stay."""
    n = len(pos)
    walls = np.zeros(n, bool) if walls is None else np.asarray(walls, dtype=bool)
    moving, wall = np.flatnonzero(~walls), np.flatnonzero(walls)
    if not len(moving) or k < 1:
        return np.zeros((2, 0), np.int64)
    bound = np.nextafter(radius, np.inf)             # query keeps distances < bound; query_pairs keeps <= radius
    candidates = [_nearest(cKDTree(pos[moving]), moving, pos, np.arange(n), k + 1, bound)]
    if len(wall):
        candidates.append(_nearest(cKDTree(pos[wall]), wall, pos, moving, k, bound))
    recv, send, length = (np.concatenate(c) for c in zip(*candidates))
    keep = (send != recv) & (length <= radius)
    recv, send, length = recv[keep], send[keep], length[keep]
    order = np.lexsort((send, length, recv))          # by receiver, nearest first (ties: smaller sender id)
    recv, send = recv[order], send[order]
    rank = np.arange(len(recv)) - np.searchsorted(recv, recv, side="left")
    return np.stack([recv[rank < k], send[rank < k]]).astype(np.int64)


def _nearest(tree: cKDTree, tree_ids: np.ndarray, pos: np.ndarray, receivers: np.ndarray, k: int,
             bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(receiver, sender, distance) of every receiver's k nearest tree nodes closer than ``bound``."""
    k = min(k, len(tree_ids))
    length, index = tree.query(pos[receivers], k=k, distance_upper_bound=bound)
    length, index = length.reshape(len(receivers), k), index.reshape(len(receivers), k)
    found = index < len(tree_ids)                     # missing neighbours come back as index len(tree)
    return np.repeat(receivers, k).reshape(-1, k)[found], tree_ids[index[found]], length[found]


def drop_longest_edges(edge_index: np.ndarray, pos: np.ndarray, cutoff_rate: float,
                       node_ids: np.ndarray | None = None) -> np.ndarray:
    """Edge dropping (docs/maths.md §2): keep the shortest ⌊(1 − r)·|E|⌋ edges of the graph, drop the longest,
    keeping or dropping the two directions of a pair together.

    ``cutoff_rate`` r in [0, 1]; r = 1 leaves no real edge, so only virtual nodes carry information. Ties
    are broken by the pair's smaller node id, then its larger one, then the receiver (:func:`edge_order`),
    so the two directions of a pair (always one length) are adjacent in the order; when the keep boundary
    falls between them, both are dropped (:func:`whole_pairs`: at most ⌊(1 − r)·|E|⌋ edges are kept, one
    fewer in that case). ``node_ids`` maps the rows of ``pos`` to the ids that decide (default: the rows
    themselves), so that a rank holding part of a graph decides as one device holding all of it.
    """
    if not 0.0 <= cutoff_rate <= 1.0:
        raise ConfigError(f"cutoff_rate must be in [0, 1], got {cutoff_rate}")
    if cutoff_rate == 0.0:
        return edge_index
    keep = int(np.floor((1.0 - cutoff_rate) * edge_index.shape[1]))
    length2 = np.square(pos[edge_index[0]] - pos[edge_index[1]]).sum(axis=1)
    ids = edge_index if node_ids is None else np.asarray(node_ids)[edge_index]
    order = edge_order(ids[0], ids[1], length2)
    keep = whole_pairs(ids[0][order], ids[1][order], keep)
    return edge_index[:, np.sort(order[:keep])]


def edge_order(receivers: np.ndarray, senders: np.ndarray, length2: np.ndarray) -> np.ndarray:
    """Edge positions from shortest to longest, the order dropping keeps. Ties by the pair's smaller id, then
    its larger id, then the receiver: the two directions of a pair sit next to each other."""
    return np.lexsort((receivers, np.maximum(receivers, senders), np.minimum(receivers, senders), length2))


def whole_pairs(receivers: np.ndarray, senders: np.ndarray, keep: int) -> int:
    """How many edges of an ordered list (:func:`edge_order`) to keep so that no pair is split: ``keep``, or
    ``keep − 1`` when edge ``keep − 1`` (the last kept) and edge ``keep`` (the first dropped) are the two
    directions of one pair, which are then dropped together."""
    if 0 < keep < len(receivers):
        last, first = keep - 1, keep
        if receivers[last] == senders[first] and senders[last] == receivers[first]:
            return keep - 1
    return keep


def mean_degree(pos: np.ndarray, radius: float | None) -> float:
    """Edges per node of the radius graph of ``pos`` (complete graph for None): n − 1."""
    if radius is None or len(pos) < 2:
        return float(max(len(pos) - 1, 0))
    return 2.0 * len(cKDTree(pos).query_pairs(radius, output_type="ndarray")) / len(pos)


def node_features(recipe: list[str], vel: np.ndarray, scalars: np.ndarray, scalar_names: list[str]) -> np.ndarray:
    """Invariant node features f_i, one column per recipe entry: (n, len(recipe)) float32.

    ``speed`` is |v_i|; any other entry names a column of the store's node_scalars (e.g. ``charge``).
    """
    columns = []
    for name in recipe:
        if name == "speed":
            columns.append(np.linalg.norm(vel, axis=1))
        elif name in scalar_names:
            columns.append(scalars[:, scalar_names.index(name)])
        else:
            raise ConfigError(f"unknown node feature {name!r} in dataset.node_features: use one of "
                             f"{[*NODE_FEATURE_RECIPES, *scalar_names]}")
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(vel), 0), np.float32)


def up_of(gravity) -> np.ndarray | None:
    """The unit vector against the external field, -g / |g| (3,) float64: what ``height_per_radius`` measures
    along. None without a field (None) or for a field of length 0, which has no direction."""
    if gravity is None:
        return None
    g = np.asarray(gravity, dtype=np.float64).reshape(3)
    length = np.linalg.norm(g)
    return None if length == 0 else -g / length


def edge_features(recipe: list[str], edge_index: np.ndarray, pos: np.ndarray, scalars: np.ndarray,
                  scalar_names: list[str], vel: np.ndarray | None = None,
                  radius: float | None = None, up: np.ndarray | None = None) -> np.ndarray:
    """Invariant edge attributes e_ij at the input frame: (E, len(recipe)) float32.

    ``distance`` |x_i − x_j|, ``distance_sq`` its square, ``<scalar>_product`` the product of a node scalar
    at both ends (e.g. ``charge_product`` = q_i q_j), ``distance_per_radius`` |x_i − x_j| / ``radius`` (a radius
    graph's neighbours at 0..1 whatever the length unit: on the SPH fluid |x_i − x_j| is ~0.05 m, beside velocities
    of ~1 m per task step, an input an MLP barely sees), ``radial_velocity`` the speed at which the pair separates,
    (v_i − v_j) · (x_i − x_j) / |x_i − x_j| (negative: closing; 0 for coincident ends), from ``vel`` (the input
    velocities, training units). A wall does not move, so on a wall -> particle edge it is the particle's speed
    away from that wall: what an EGNN message otherwise cannot see in its first layer, whose inputs hold |v_i|
    and distances but no direction of motion. Rotating or reflecting x and v together, or translating x, leaves
    it unchanged. Example: x_i = (0, 1, 0), v_i = (0, -2, 0) above a wall at the origin: -2 (closing at 2).

    ``height_per_radius`` (x_i − x_j) · u / ``radius``, u = −g / |g| the direction against the external field
    (:func:`up_of` of ``dataset.gravity``): how far the receiver sits above the sender, in radii. Distances alone
    leave a wall's two sides alike: a particle just below a floor of wall particles hears the same distances as
    one just above it, and the message's push along x_i − x_j, which holds the particle above, sends the one
    below further down. With this column a message knows which side it is on. Rotating or reflecting x and g
    together, or translating x, leaves it unchanged (u · (x_i − x_j) is a dot product of two vectors that turn
    together). Example: gravity (0, -9.81, 0), x_i = (0, 0.03, 0) above a wall at the origin, radius 0.075: 0.4;
    the wall's edge from a particle at (0, -0.03, 0) below it: -0.4.
    """
    recv, send = edge_index
    apart = pos[recv] - pos[send]                 # x_i - x_j, shared by the geometric recipes
    length_sq = np.square(apart).sum(axis=1)
    columns = []
    for name in recipe:
        if name == "distance":
            columns.append(np.sqrt(length_sq))
        elif name == "distance_sq":
            columns.append(length_sq)
        elif name == "distance_per_radius":
            if radius is None:
                raise ValueError("edge feature 'distance_per_radius' needs the graph's radius (radius=)")
            columns.append(np.sqrt(length_sq) / radius)
        elif name == "radial_velocity":
            if vel is None:
                raise ValueError("edge feature 'radial_velocity' needs the input velocities (vel=)")
            length = np.sqrt(length_sq)
            closing = np.einsum("ij,ij->i", vel[recv] - vel[send], apart)
            columns.append(np.divide(closing, length, out=np.zeros_like(closing), where=length > 0))
        elif name == "height_per_radius":
            if radius is None or up is None:
                raise ValueError("edge feature 'height_per_radius' needs the graph's radius (radius=) and the "
                                 "direction against the field (up=, datasets.graphs.up_of(gravity))")
            columns.append(apart @ up / radius)
        elif name.endswith("_product") and name[: -len("_product")] in scalar_names:
            col = scalars[:, scalar_names.index(name[: -len("_product")])]
            columns.append(col[recv] * col[send])
        else:
            raise ConfigError(f"unknown edge feature {name!r} in dataset.edge_features: use one of "
                             f"{[*EDGE_FEATURE_RECIPES, *(s + '_product' for s in scalar_names)]}")
    if not columns:
        return np.zeros((edge_index.shape[1], 0), np.float32)
    return np.stack(columns, axis=1).astype(np.float32)
