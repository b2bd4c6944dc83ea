"""Make a dataset store from its source: one entry point for every generator and converter."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from datasets.nbody import NBodyConfig, generate_nbody
from datasets.synthetic import SyntheticConfig, generate_synthetic

SOURCES = ("nbody", "synthetic")


def prepare_dataset(dataset: Mapping[str, Any], path: str | Path, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Create the store described by a dataset config (``dataset.source`` picks the generator)."""
    source = dataset["source"]
    if source == "nbody":
        if dataset.get("nbody") is None:
            raise ValueError(f"dataset {dataset['name']!r} has source nbody but no dataset.nbody parameters")
        return generate_nbody(path, NBodyConfig(**dict(dataset["nbody"])), dataset=dataset["name"],
                              overwrite=overwrite, progress=progress)
    if source == "synthetic":
        if dataset.get("synthetic") is None:
            raise ValueError(f"dataset {dataset['name']!r} has source synthetic but no dataset.synthetic parameters")
        return generate_synthetic(path, SyntheticConfig(**dict(dataset["synthetic"])), dataset=dataset["name"],
                                  overwrite=overwrite, progress=progress)
    raise ValueError(f"dataset.source={source!r} cannot be prepared: known sources are {SOURCES}")
