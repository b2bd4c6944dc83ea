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

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from dist_egnn.datasets.store import StoreError, StoreInfo, check_store_path
from dist_egnn.errors import ConfigError

SOURCES = ("nbody", "sph", "md", "gns", "synthetic")
SOURCE_RADIUS = {"sph": 0.075, "md": 10.0, "gns": None}

# Generator keys that say how a store is made, not what it holds: a store made with other values is the same
# store (workers, retries, timeouts, write batching). Neither the store-config comparison nor the store's
# identity counts them.
RUN_OPTIONS = {"nbody": ("scenes_per_batch",), "synthetic": (), "sph": ("retries", "timeout_s", "threads_per_scene"),
               "md": ("frames_per_write",), "gns": ("frames_per_write",)}
# Keys the generator records resolved (files as absolute paths): compared by file name, so a store copied to
# another machine still matches.
PATH_KEYS = {"md": ("topology", "trajectories"), "gns": ("path",)}
# Keys whose None means "the generator decides" (it records what it chose), or "not needed once converted"
# (the GNS folder): compared only when configured.
DERIVED_KEYS = {"gns": ("path", "wall_types"), "md": ("dt",)}


def prepare_dataset(dataset: Mapping[str, Any], path: str | Path, overwrite: bool = False,
                    progress: bool = True, scheduler: str = "auto", workers: int | None = None,
                    cluster: str | None = None) -> Path:
    """Create the store described by a dataset config (``dataset.source`` picks the generator)."""
    source, name = dataset["source"], dataset["name"]
    check_store_path(path)                  # a dangling or looping link: refused before any work
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


# ------------------------------------------------------------------------------ a store and its configuration
def _names(value: Any) -> Any:
    """File names of a path or a list of paths (``MDAnalysisTests:PSF`` resolved first), for comparison."""
    if isinstance(value, (list, tuple)):
        return [_names(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("MDAnalysisTests:"):
        from dist_egnn.datasets.md import resolve_path
        try:
            value = resolve_path(value)
        except Exception:  # noqa: BLE001 - MDAnalysisTests missing: compare the name as written
            return value.split(":", 1)[1]
    return Path(value).name


def _comparable(source: str, key: str, value: Any) -> Any:
    if key in PATH_KEYS.get(source, ()):
        value = _names(value)
        if source == "md" and key == "topology" and isinstance(value, list) and len(set(value)) == 1:
            value = value[0]                  # one topology for every trajectory, recorded once per trajectory
    return value


def store_differences(dataset: Mapping[str, Any], attrs: Mapping[str, Any]) -> list[str]:
    """``dataset.<source>.<key>: store <value>, configured <value>`` for every generator parameter of the dataset
    configuration that the store at hand was made with another value of (:data:`RUN_OPTIONS` do not count;
    keys the store does not record, from an older dist-egnn, are not compared). ``dataset.radius`` is not a
    generator parameter: graphs are built from it when training, whatever the store's default radius."""
    source = dataset.get("source")
    if attrs.get("source") != source:
        return [f"dataset.source: store {attrs.get('source')!r}, configured {source!r}"]
    configured = dataset.get(source) or {}
    recorded = attrs.get("generator") or {}
    if isinstance(configured, Mapping) and source == "md" and isinstance(configured.get("topology"), str):
        configured = dict(configured)
        configured["topology"] = [configured["topology"]] * max(len(configured.get("trajectories") or []), 1)
    differences = []
    for key, value in dict(configured).items():
        if key in RUN_OPTIONS.get(source, ()) or key not in recorded:
            continue
        if value is None and key in DERIVED_KEYS.get(source, ()):
            continue
        have, want = _comparable(source, key, recorded[key]), _comparable(source, key, value)
        if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
            same = float(have) == float(want)
        else:
            same = json.dumps(have, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)
        if not same:
            differences.append(f"dataset.{source}.{key}: store {recorded[key]!r}, configured {value!r}")
    return differences


def check_store_matches(dataset: Mapping[str, Any], info: StoreInfo) -> None:
    """Stop with :class:`StoreError` when the store was made with other generator parameters than the dataset
    configuration holds: training would use the old data while config.yaml records the new values."""
    differences = store_differences(dataset, info.attrs)
    if differences:
        raise StoreError(
            f"{info.path} was made with other generator parameters than this configuration "
            f"({'; '.join(differences[:8])}{' ...' if len(differences) > 8 else ''}): training would use the old "
            f"data. Use the store's values, give the new data another name (dataset.name=... or paths.data=...), "
            f"or rebuild the store: python launch/prepare.py dataset={dataset.get('name')} prepare.overwrite=true "
            f"with the same overrides")


def store_record(info: StoreInfo) -> dict[str, Any]:
    """What identifies a store's contents: its source, units, time step, default radius, node scalars, the
    generator's parameters (:data:`RUN_OPTIONS` left out, paths as file names) and each split's shape. Two
    stores with the same record hold the same data (the generators are deterministic); the name and the
    folder do not count, so a copied or moved store is the same store."""
    attrs = info.attrs
    source = attrs.get("source")
    generator = {k: _comparable(source, k, v) for k, v in (attrs.get("generator") or {}).items()
                 if k not in RUN_OPTIONS.get(source, ())}
    record = {key: attrs.get(key) for key in ("source", "dt", "units", "radius", "node_scalars")}
    record["generator"] = generator
    record["splits"] = {name: [s.num_scenes, s.num_frames, s.num_nodes] for name, s in info.splits.items()}
    return json.loads(json.dumps(record, default=str))          # plain JSON data (what a manifest holds)


def store_identity(info: StoreInfo) -> dict[str, Any]:
    """``{"path", "hash", "record"}`` of a store (:func:`store_record`; hash: SHA-256 of it, 16 hex digits):
    what a checkpoint records to refuse a resume on other data."""
    record = store_record(info)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return dict(path=str(info.path), hash=digest, record=record)
