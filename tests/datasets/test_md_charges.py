"""The MD source's charges: a topology without charges gives zeros and a note; any other error is not hidden."""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from dist_egnn.datasets.md import _charges

mda = pytest.importorskip("MDAnalysis")
datafiles = pytest.importorskip("MDAnalysisTests.datafiles")


def backbone(*files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimpleNamespace(atoms=mda.Universe(*files).select_atoms("backbone"))


def test_a_topology_with_charges():
    traj = backbone(datafiles.PSF, datafiles.DCD)
    charges, found = _charges(traj)
    assert found and charges.dtype == np.float32
    np.testing.assert_allclose(charges, traj.atoms.charges, atol=1e-6)


def test_a_topology_without_charges_gives_zeros():
    traj = backbone(datafiles.PDB_small)                    # PDB: no partial charges (MDAnalysis NoDataError)
    charges, found = _charges(traj)
    assert not found and charges.shape == (traj.atoms.n_atoms,) and not charges.any()


class Broken:
    """Atoms whose charges fail for another reason than "the topology has none" (a bug, a damaged file)."""

    n_atoms = 3

    def __init__(self, error: Exception):
        self.error = error

    @property
    def charges(self):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("could not convert"), AttributeError("no attribute 'x'"),
                                   OSError("read failed")])
def test_other_errors_are_not_reported_as_no_charges(error):
    with pytest.raises(type(error), match=str(error)):
        _charges(SimpleNamespace(atoms=Broken(error)))
