"""dist-egnn: equivariant graph neural networks (EGNN, FastEGNN, DistEGNN) for large geometric graphs."""
__version__ = "0.1.0"


def load_model(run_dir, device="cpu", dtype=None):
    """The trained model of a run directory (``config.yaml`` + ``checkpoints/best.pt``) in eval mode, ready to
    call as in training; ``model.config`` is the run's configuration. See ``dist_egnn.inference.load``."""
    from dist_egnn.inference.load import load_model as load  # lazy: importing dist_egnn stays light

    return load(run_dir, device=device, dtype=dtype)
