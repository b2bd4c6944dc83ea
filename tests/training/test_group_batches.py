"""How the batches of a split are dealt to G graph groups (data parallel): what keeps every group's collectives
in step. guards: a group with fewer evaluation forwards than another under FSDP (the parameter all-gather of one
group met the MSE's all-reduce of the other: torchrun --nproc-per-node 2 engine=fsdp failed at its first
evaluation), and a training split with fewer batches than groups (a group without a batch skipped every step's
collectives)."""
from types import SimpleNamespace

import numpy as np
import pytest

from dist_egnn.errors import ConfigError
from dist_egnn.training.rank_data import RankData


class Samples:
    def __init__(self, n: int):
        self.n, self.meta = n, SimpleNamespace(scene_ptr=np.array([0, 4]))

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("samples", range(1, 8))
@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_every_group_runs_as_many_evaluation_forwards_and_every_sample_is_scored_once(samples, batch_size, groups):
    data = RankData(Samples(samples))
    dealt = [data.eval_batch_ids(batch_size, group=g, groups=groups) for g in range(groups)]
    assert len({len(batches) for batches, _ in dealt}) == 1                        # the same number of forwards
    scored = np.concatenate([np.concatenate(batches[:count]) for batches, count in dealt if count])
    np.testing.assert_array_equal(np.sort(scored), np.arange(samples))


@pytest.mark.parametrize("samples, batch_size, groups", [(7, 2, 3), (6, 3, 2), (4, 1, 3), (3, 3, 1)])
def test_every_group_gets_as_many_training_batches(samples, batch_size, groups):
    data = RankData(Samples(samples))
    dealt = [data.batch_ids(batch_size, shuffle=True, seed=0, epoch=1, group=g, groups=groups, equal_steps=True)
             for g in range(groups)]
    assert {len(batches) for batches in dealt} == {data.num_steps(batch_size, groups)}


def test_fewer_training_batches_than_groups_is_refused_naming_the_batch_size():
    data = RankData(Samples(3))
    for call in (lambda: data.num_steps(2, groups=3),
                 lambda: data.batch_ids(2, shuffle=True, seed=0, epoch=1, group=2, groups=3, equal_steps=True)):
        with pytest.raises(ConfigError, match=r"trainer.batch_size=2: the training split's 3 samples make 2 batch"):
            call()
