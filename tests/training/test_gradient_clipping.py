"""engine.gradient_clipping under the plain engine (DDP and FSDP share Engine.step): the optimizer sees the
gradient scaled to the clip norm, and 0 leaves it alone. DeepSpeed clips through its own configuration
(tests/launch/test_launch.py checks the value it gets)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dist_egnn.engines import build_engine


def stepped(clip: float) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.zeros(4))
    module = torch.nn.Module()
    module.weight = weight
    cfg = OmegaConf.create({"engine": {"gradient_clipping": clip}})
    engine = build_engine("plain", module, lambda params: torch.optim.SGD(params, lr=1.0), cfg, groups=None)
    engine.zero_grad()
    (weight * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()        # gradient norm 5
    engine.step()
    return -weight.detach()                                              # the step SGD took: lr x gradient


@pytest.mark.parametrize("clip, norm", [(0.0, 5.0), (1.0, 1.0), (10.0, 5.0)])
def test_the_step_uses_the_clipped_gradient(clip, norm):
    step = stepped(clip)
    assert step.norm().item() == pytest.approx(norm, rel=1e-6)
    assert step[1].item() / step[0].item() == pytest.approx(4 / 3)       # the direction is kept


def test_a_zero_stage_for_an_engine_that_is_not_deepspeed_is_refused():
    """guards: engine.zero_stage=3 under torchrun (engine=auto resolves to DDP) trained unsharded, silently."""
    from dist_egnn.config import check, compose_config
    from dist_egnn.errors import ConfigError

    module = torch.nn.Linear(2, 2)
    cfg = OmegaConf.create({"engine": {"name": "auto", "zero_stage": 3, "gradient_clipping": 0.0}})
    with pytest.raises(ConfigError, match=r"engine.zero_stage=3 is DeepSpeed's ZeRO stage, but the run's engine is "
                                          r"ddp \(engine.name=auto\)"):
        build_engine("ddp", module, lambda params: torch.optim.SGD(params, lr=1.0), cfg, groups=None)
    with pytest.raises(ConfigError, match="the run's engine is fsdp, which would ignore it"):
        check(compose_config("engine=fsdp", "engine.zero_stage=2"))
    check(compose_config("engine=deepspeed", "engine.zero_stage=2"))
