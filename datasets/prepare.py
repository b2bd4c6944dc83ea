"""Make a dataset store from its source: one entry point for every generator and converter.

``dataset.source`` picks the module; its parameters live in the config section of the same name:

    source   section   module              what it makes
    nbody    nbody     datasets/nbody.py   charged N-body systems (simulated here)
    sph      sph       datasets/sph.py     SPH fluids through SPlisHSPlasH (pysplishsplash)
    md       md        datasets/md.py      protein MD read by MDAnalysis
    gns      gns       datasets/gns.py     GNS / LagrangeBench HDF5 files converted

The store's default radius-graph cutoff is ``dataset.radius`` when set, else the source's own default
(SPH 0.075, MD 10 Å, GNS the files' ``default_connectivity_radius``, N-body none: complete graph).
``scheduler``, ``workers`` and ``cluster`` say where parallel generation runs (``datasets/parallel.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dist_egnn.errors import ConfigError

SOURCES = ("nbody", "sph", "md", "gns", "synthetic")
SOURCE_RADIUS = {"sph": 0.075, "md": 10.0, "gns": None}


def prepare_dataset(dataset: Mapping[str, Any], path: str | Path, overwrite: bool = False,
                    progress: bool = True, scheduler: str = "auto", workers: int | None = None,
                    cluster: str | None = None) -> Path:
    """Create the store described by a dataset config (``dataset.source`` picks the generator)."""
    source, name = dataset["source"], dataset["name"]
    if source not in SOURCES:
        raise ConfigError(f"dataset.source={source!r} cannot be prepared: known sources are {SOURCES}")
    params = dataset.get(source)
    if params is None and source != "gns":
        raise ConfigError(f"dataset {name!r} has source {source} but no dataset.{source} parameters")
    params = dict(params or {})
    radius = dataset.get("radius")
    if radius is None:
        radius = SOURCE_RADIUS.get(source)
    parallel = dict(scheduler=scheduler, workers=workers, cluster=cluster)
    if source == "nbody":
        from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody

        return generate_nbody(path, NBodyConfig(**params), dataset=name, overwrite=overwrite, progress=progress,
                              **parallel)
    if source == "synthetic":
        from dist_egnn.datasets.synthetic import SyntheticConfig, generate_synthetic

        return generate_synthetic(path, SyntheticConfig(**params), dataset=name, overwrite=overwrite,
                                  progress=progress)
    if source == "sph":
        from dist_egnn.datasets.sph import SPHConfig, generate_sph

        return generate_sph(path, SPHConfig(**params), dataset=name, overwrite=overwrite, progress=progress,
                            radius=radius, **parallel)
    if source == "md":
        from dist_egnn.datasets.md import MDConfig, generate_md

        return generate_md(path, MDConfig(**params), dataset=name, overwrite=overwrite, progress=progress,
                           radius=radius)
    from dist_egnn.datasets.gns import GNSConfig, convert_gns

    return convert_gns(path, GNSConfig(**params), dataset=name, overwrite=overwrite, progress=progress,
                       radius=dataset.get("radius"))
