"""From a trained run to predictions: load its model, roll it out, write what people look at.

* ``load.py``: :func:`~dist_egnn.inference.load.load_model` (``dist_egnn.load_model``): a run directory's
  ``config.yaml`` and ``checkpoints/best.pt`` -> the model in eval mode, ready to call.
* ``rollout.py``: multi-step rollouts that feed predictions back as inputs, the graph rebuilt from the
  predicted positions every step with the loader's recipe (``dist_egnn.datasets.graphs``), on one part or P
  parts re-partitioned every step; per-step MSE beside constant velocity.
* ``writers.py``: ``rollout.json``, the predicted trajectories as a zarr store in the dataset layout,
  ``.vtu`` frames for ParaView (meshio), a PNG.
* ``predict.py``: what ``python launch/predict.py`` runs: checks, the rollout, the outputs written at once.

Nothing here imports ``torch.distributed``: a rollout over P parts runs the P parts in this process.
"""
