"""Training: set-up (:mod:`~dist_egnn.training.setup`), the Trainer, and what it keeps and writes.

    ready = setup.prepare(cfg, run_dir)        # checks, runtime, data, partitions, model and engine
    result = Trainer(ready).fit()              # or Trainer.from_config(cfg, run_dir).fit()

Around them: :mod:`~dist_egnn.training.rank_data` (what one rank reads for a batch),
:mod:`~dist_egnn.training.state` (position and running sums), :mod:`~dist_egnn.training.callbacks`
(hooks into every step), :mod:`~dist_egnn.training.checkpoint` and :mod:`~dist_egnn.training.resume`
(resume points), :mod:`~dist_egnn.training.guard` (stop signals, NaN/Inf) and
:mod:`~dist_egnn.training.faults` (fault injection for drills).
"""
