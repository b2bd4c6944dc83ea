"""dist-egnn: equivariant graph neural networks (EGNN, FastEGNN, DistEGNN) for large geometric graphs."""
__version__ = "0.1.0"


def compose_config(*overrides: str, config_name: str = "config"):
    """The DictConfig ``python launch/train.py <overrides>`` would run, composed without Hydra's command line;
    train it with ``Trainer.from_config(cfg, run_dir).fit()`` (``dist_egnn.training.trainer``). See
    ``dist_egnn.config.compose_config``."""
    from dist_egnn.config import compose_config as compose  # lazy: importing dist_egnn stays light

    return compose(*overrides, config_name=config_name)


def load_model(run_dir, device="cpu", dtype=None):
    """The trained model of a run directory (``config.yaml`` + ``checkpoints/best.pt``) in eval mode, ready to
    call as in training; ``model.config`` is the run's configuration. See ``dist_egnn.inference.load``."""
    from dist_egnn.inference.load import load_model as load  # lazy: importing dist_egnn stays light

    return load(run_dir, device=device, dtype=dtype)
