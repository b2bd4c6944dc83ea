"""One config source: the Hydra schema and the generators, studies and YAML files must not drift apart.

Each generator's settings are defined once, by its dataclass in ``datasets/``; the schema (dist_egnn/config.py)
uses that class as the type of the ``dataset.<source>`` section, and ``register()`` is the one place that
stores configuration with Hydra (``base_config``, ``study_schema``, ``scaling_schema``, ``predict_schema``).
"""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dist_egnn import config as schema
from dist_egnn.datasets import gns, md, nbody, prepare, sph, synthetic
from dist_egnn.keys import SPLITS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "launch" / "conf"
DATASET_YAMLS = sorted((CONF / "dataset").glob("*.yaml"))
STUDY_YAMLS = sorted((CONF / "study").glob("*.yaml"))
# source -> (the generator's module, its dataclass, the function prepare_dataset hands that dataclass to)
GENERATORS = {
    "nbody": (nbody, nbody.NBodyConfig, "generate_nbody"),
    "synthetic": (synthetic, synthetic.SyntheticConfig, "generate_synthetic"),
    "sph": (sph, sph.SPHConfig, "generate_sph"),
    "md": (md, md.MDConfig, "generate_md"),
    "gns": (gns, gns.GNSConfig, "convert_gns"),
}
SCHEMA_NAMES = {"base_config", "study_schema", "scaling_schema", "predict_schema"}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def composed(config_name: str, *overrides: str):
    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


# ----------------------------------------------------------------------------- generators: one definition
def test_every_source_has_a_section_typed_by_its_generator_dataclass():
    assert set(GENERATORS) == set(prepare.SOURCES)
    hints = typing.get_type_hints(schema.DatasetConfig)
    for source, (_, cls, _) in GENERATORS.items():
        assert source in hints, f"DatasetConfig has no `{source}` section"
        assert hints[source] == typing.Optional[cls], (
            f"DatasetConfig.{source} is {hints[source]}, not Optional[{cls.__module__}.{cls.__name__}]")


def test_no_copy_of_a_generator_dataclass_in_the_schema():
    """A hand-copied field list (what SPHGenerator/MDGenerator/GNSConverter were) is refused."""
    generator_fields = {source: set(field_names(cls)) for source, (_, cls, _) in GENERATORS.items()}
    for name, obj in vars(schema).items():
        if not (dataclasses.is_dataclass(obj) and isinstance(obj, type)) or obj.__module__ != schema.__name__:
            continue
        mine = set(field_names(obj))
        for source, theirs in generator_fields.items():
            overlap = mine & theirs
            assert len(overlap) < max(2, len(theirs) // 2), (
                f"dist_egnn.config.{name} repeats the fields {sorted(overlap)} of the {source} generator's "
                f"dataclass: use that dataclass instead")


@pytest.mark.parametrize("source", sorted(GENERATORS))
def test_generator_dataclass_is_a_valid_structured_config_with_commented_fields(source):
    module, cls, _ = GENERATORS[source]
    node = OmegaConf.structured(cls)              # only OmegaConf-friendly field types
    assert list(node.keys()) == field_names(cls)
    assert OmegaConf.to_container(node) == dataclasses.asdict(cls())
    # every field carries a comment or sits under one (the schema's documentation is the generator's)
    lines = Path(module.__file__).read_text().splitlines()
    body = next(n for n in ast.walk(ast.parse("\n".join(lines)))
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    for stmt in body.body:
        if isinstance(stmt, ast.AnnAssign):
            line = lines[stmt.lineno - 1]
            above = lines[stmt.lineno - 2].strip()
            assert "#" in line or above.startswith("#"), f"{cls.__name__}.{stmt.target.id} has no comment"


def _reads(module, cls) -> set[str]:
    """Attribute names the generator module reads from its config: ``cfg.NAME`` anywhere, ``self.NAME`` in the
    dataclass body, and the split counts where it reads ``getattr(cfg, split)``."""
    tree = ast.parse(Path(module.__file__).read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    reads = set()
    for where, names in ((tree, {"cfg"}), (body, {"self"})):
        for node in ast.walk(where):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
                reads.add(node.attr)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in names
                    and isinstance(node.args[1], ast.Name) and node.args[1].id == "split"):
                reads.update(SPLITS)
    return reads


@pytest.mark.parametrize("source", sorted(GENERATORS))
def test_generator_reads_exactly_its_dataclass_fields(source):
    module, cls, _ = GENERATORS[source]
    fields = set(field_names(cls))
    reads = _reads(module, cls)
    derived = {name for name in reads - fields if callable(getattr(cls, name, None))
               or isinstance(getattr(cls, name, None), property)}
    assert reads - fields - derived == set(), f"{source} generator reads keys its dataclass lacks"
    assert fields - reads == set(), f"{source} dataclass has keys its generator never reads"


# ------------------------------------------------------------------------------------------ the YAML files
@pytest.mark.parametrize("path", DATASET_YAMLS, ids=lambda p: p.stem)
def test_dataset_yaml_composes_and_its_generator_keys_exist(path):
    raw = yaml.safe_load(path.read_text())
    source = raw["source"]
    assert source in GENERATORS, f"{path.name}: source {source!r}"
    _, cls, _ = GENERATORS[source]
    assert set(raw) <= set(field_names(schema.DatasetConfig)), f"{path.name}: keys the schema lacks"
    assert set(raw[source]) <= set(field_names(cls)), (
        f"{path.name}: dataset.{source} keys {sorted(set(raw[source]) - set(field_names(cls)))} "
        f"are not fields of {cls.__name__}")
    cfg = composed("config", f"dataset={path.stem}")
    section = cfg.dataset[source]
    assert OmegaConf.get_type(section) is cls
    assert list(section.keys()) == field_names(cls)
    defaults = dataclasses.asdict(cls())
    for key, value in OmegaConf.to_container(section).items():
        assert value == raw[source].get(key, defaults[key]), f"{path.name}: dataset.{source}.{key}"


@pytest.mark.parametrize("path", DATASET_YAMLS, ids=lambda p: p.stem)
def test_prepare_hands_the_composed_section_to_its_generator(path, monkeypatch, tmp_path):
    """prepare_dataset builds the generator's dataclass from the resolved section, with nothing lost."""
    cfg = composed("config", f"dataset={path.stem}", f"paths.data={tmp_path}")
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    source = dataset["source"]
    module, cls, function = GENERATORS[source]
    seen = []
    monkeypatch.setattr(module, function, lambda path, params, **kwargs: seen.append(params) or Path(path))
    prepare.prepare_dataset(dataset, tmp_path / "store.zarr", progress=False)
    assert len(seen) == 1 and type(seen[0]) is cls
    assert dataclasses.asdict(seen[0]) == dataset[source]


@pytest.mark.parametrize("override", ["dataset.sph.num_particles=100", "dataset.sph.box=[1.0,2.0,1.0]",
                                      "dataset.sph.map_cell=0.1", "dataset.sph.timeout_s=null"])
def test_generator_overrides_still_work(override):
    cfg = composed("config", "dataset=fluid_small", override)
    key, value = override.split("=")
    assert OmegaConf.select(cfg, key) == yaml.safe_load(value)


@pytest.mark.parametrize("override", ["dataset.sph.bogus=1", "dataset.sph.num_particles=many",
                                      "dataset.md.stride=x", "dataset.gns.bogus=1"])
def test_generator_sections_are_typed_and_closed(override):
    data = {"sph": "fluid_small", "md": "protein_adk", "gns": "water3d"}[override.split(".")[1]]
    with pytest.raises(ConfigCompositionException):
        composed("config", f"dataset={data}", override)


# ------------------------------------------------------------------------------------ register() and schemas
def test_register_is_idempotent_and_stores_every_schema():
    schema.register()
    repo = ConfigStore.instance().repo
    first = {name: repo[f"{name}.yaml"].node for name in SCHEMA_NAMES}
    schema.register()
    assert set(schema.SCHEMAS) == SCHEMA_NAMES
    for name in SCHEMA_NAMES:
        assert repo[f"{name}.yaml"].node == first[name]
    assert OmegaConf.has_resolver("len") and OmegaConf.has_resolver("run_stamp")


def test_no_module_registers_configuration_at_import():
    """Importing the entry points' modules stores nothing; register() stores exactly the four schemas."""
    code = (
        "from hydra.core.config_store import ConfigStore\n"
        "import dist_egnn.config, dist_egnn.measure.study, dist_egnn.measure.scaling_study\n"
        "import dist_egnn.inference.predict\n"
        "names = lambda: {k for k in ConfigStore.instance().repo\n"
        "                 if k.endswith('_schema.yaml') or k == 'base_config.yaml'}\n"
        "assert names() == set(), names()\n"
        "dist_egnn.config.register()\n"
        "assert names() == {'base_config.yaml', 'study_schema.yaml', 'scaling_schema.yaml',\n"
        "                   'predict_schema.yaml'}, names()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for folder in ("dist_egnn", "datasets", "partitioners", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "dist_egnn" / "config.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    imported = {a.name for a in node.names} | {getattr(node, "module", None) or ""}
                    assert not {"ConfigStore", "hydra.core.config_store"} & imported, (
                        f"{path.relative_to(ROOT)} imports ConfigStore: register schemas in dist_egnn.config.register")


def test_launch_study_registers_before_hydra_main():
    tree = ast.parse((ROOT / "launch" / "study.py").read_text())
    calls = [n.lineno for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "register"]
    mains = [n.lineno for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert calls and mains and calls[0] < mains[0]


@pytest.mark.parametrize("path", STUDY_YAMLS, ids=lambda p: p.stem)
def test_every_study_composes_against_the_study_schema(path):
    cfg = composed("study", f"study={path.stem}")
    assert OmegaConf.get_type(cfg.study) is schema.StudySpec
    assert cfg.study.runs and all(OmegaConf.get_type(run) is schema.StudyRun for run in cfg.study.runs)
    assert cfg.study.baseline in [None, *[run.label for run in cfg.study.runs]]
    with pytest.raises(ConfigCompositionException):
        composed("study", f"study={path.stem}", "study.bogus=1")


def test_scaling_composes_against_the_scaling_schema():
    cfg = composed("scaling", "parts=[1,2]")
    assert list(cfg.keys()) == field_names(schema.ScalingConfig) and list(cfg.parts) == [1, 2]
    assert cfg.name == f"scaling-{cfg.data}"
    with pytest.raises(ConfigCompositionException):
        composed("scaling", "bogus=1")


def test_predict_composes_against_the_predict_schema():
    cfg = composed("predict", "run=runs/x", "steps=3", "format=vtk")
    assert list(cfg.keys()) == field_names(schema.PredictConfig)
    assert (cfg.run, cfg.steps, cfg.format, cfg.split) == ("runs/x", 3, "vtk", "test")
    with pytest.raises(ConfigCompositionException):
        composed("predict", "bogus=1")
    with pytest.raises(ConfigCompositionException):
        composed("predict", "steps=many")


# ------------------------------------------------------------------------------------------- trainer options
def test_normalization_is_checked_against_its_choices():
    """trainer.normalization (issue 19 item 5): none by default, rms and radius accepted, anything else a
    ConfigError naming the key and the choices."""
    from dist_egnn.errors import ConfigError

    assert composed("config").trainer.normalization == "none"
    schema.check(composed("config", "trainer.normalization=rms"))
    schema.check(composed("config", "trainer.normalization=radius"))
    with pytest.raises(ConfigError, match=r"trainer\.normalization='std': choose one of \('none', 'rms', 'radius'\)"):
        schema.check(composed("config", "trainer.normalization=std"))


def test_noise_target_is_checked_against_its_choices():
    """trainer.noise_target: clean by default (the target stays the true next position), shifted (GNS) accepted."""
    from dist_egnn.errors import ConfigError

    assert composed("config").trainer.noise_target == "clean"
    schema.check(composed("config", "trainer.noise_target=shifted"))
    with pytest.raises(ConfigError, match=r"trainer\.noise_target='gns': choose one of \('clean', 'shifted'\)"):
        schema.check(composed("config", "trainer.noise_target=gns"))


# --------------------------------------------------------------------------------- dataset.wall_neighbors_reach
def test_wall_neighbors_reach_is_off_by_default_and_refuses_nonsense():
    """A reach is a positive length and bounds the nearest-wall edges: without them (wall_neighbors=0) it would
    do nothing, which the check says rather than ignore."""
    from dist_egnn.errors import ConfigError

    assert composed("config").dataset.wall_neighbors_reach is None
    schema.check(composed("config", "dataset.wall_neighbors=2", "dataset.wall_neighbors_reach=0.76"))
    with pytest.raises(ConfigError, match=r"dataset\.wall_neighbors_reach=0\.0: must be > 0"):
        schema.check(composed("config", "dataset.wall_neighbors=2", "dataset.wall_neighbors_reach=0"))
    with pytest.raises(ConfigError, match=r"dataset\.wall_neighbors_reach=0\.76 with dataset\.wall_neighbors=0: "
                                          r".*set dataset\.wall_neighbors=k"):
        schema.check(composed("config", "dataset.wall_neighbors_reach=0.76"))


# ---------------------------------------------------------------------------------------- dataset.unwired_walls
def test_unwired_walls_are_kept_by_default_and_dropped_only_on_whole_graphs():
    """Stored partitions and halos, and pushforward's whole-scene rollouts, hold every wall: dropping the unwired
    ones there is refused with the keys to change, not trained on graphs that disagree."""
    from dist_egnn.errors import ConfigError

    assert composed("config").dataset.unwired_walls == "keep"
    schema.check(composed("config", "dataset.unwired_walls=drop"))
    with pytest.raises(ConfigError, match=r"dataset\.unwired_walls='some': choose one of \('keep', 'drop'\)"):
        schema.check(composed("config", "dataset.unwired_walls=some"))
    with pytest.raises(ConfigError, match=r"dataset\.unwired_walls=drop with distributed\.parts=2: .*"
                                          r"distributed\.parts=1.*dataset\.unwired_walls=keep"):
        schema.check(composed("config", "dataset.unwired_walls=drop", "distributed.parts=2"))
    with pytest.raises(ConfigError, match=r"dataset\.unwired_walls=drop with trainer\.pushforward_unrolls=2"):
        schema.check(composed("config", "dataset.unwired_walls=drop", "trainer.pushforward_unrolls=2"))


# ------------------------------------------------------------------------------------------- trainer.wall_noise
def test_wall_noise_is_off_by_default_and_on_whole_graphs_only():
    from dist_egnn.errors import ConfigError

    trainer = composed("config").trainer
    assert trainer.wall_noise == 0.0 and trainer.wall_noise_reach is None and trainer.wall_noise_velocity is True
    schema.check(composed("config", "trainer.wall_noise=0.01", "trainer.wall_noise_reach=0.1"))
    with pytest.raises(ConfigError, match=r"trainer\.wall_noise=-0\.01"):
        schema.check(composed("config", "trainer.wall_noise=-0.01"))
    with pytest.raises(ConfigError, match=r"trainer\.wall_noise_reach=0"):
        schema.check(composed("config", "trainer.wall_noise=0.01", "trainer.wall_noise_reach=0"))
    with pytest.raises(ConfigError, match=r"trainer\.wall_noise_reach=0.06 with trainer\.wall_noise=0: .*"
                                          r"set trainer\.wall_noise"):
        schema.check(composed("config", "trainer.wall_noise_reach=0.06"))            # else it changes nothing
    with pytest.raises(ConfigError, match=r"trainer\.wall_noise=0\.01 with distributed\.parts=2: .*"
                                          r"distributed\.parts=1.*trainer\.wall_noise=0"):
        schema.check(composed("config", "trainer.wall_noise=0.01", "distributed.parts=2"))


# ------------------------------------------------------------------------------------ dataset.gravity, normalize
def test_gravity_is_on_for_the_sph_fluids_and_off_elsewhere():
    """issue 17 item 2: the SPH fluids (and the GNS Water-3D converter) give every graph gravity as datasets/sph.py
    simulates it; N-body, proteins and the synthetic sets have none."""
    on = {"fluid_small", "fluid_small_walls", "water3d_like", "water3d_like_200fps", "fluid113k", "water3d"}
    for path in DATASET_YAMLS:
        gravity = composed("config", f"dataset={path.stem}").dataset.gravity
        assert (list(gravity) == [0.0, -9.81, 0.0]) if path.stem in on else gravity is None, path.stem


@pytest.mark.parametrize("value", ["[0,-9.81]", "[0,.nan,0]", "[0,.inf,0]", "[a,b,c]", "9.81", "[true,0,0]",
                                   "[0,0,0,0]"])
def test_gravity_that_is_not_three_finite_numbers_is_a_config_error(value):
    from dist_egnn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset\.gravity=.*3 finite numbers"):
        schema.check(composed("config", f"dataset.gravity={value}"))
    schema.check(composed("config", "dataset.gravity=[0,-9.81,0]"))
    schema.check(composed("config", "dataset.gravity=null"))


def test_model_normalize_defaults_off_and_the_nbody_study_turns_it_on():
    """issue 17 item 5: the authors' N-body configuration normalises x_i - x_j; the N-body study does as they do."""
    assert composed("config").model.normalize is False
    assert composed("config", "model.normalize=true").model.normalize is True
    study = yaml.safe_load((CONF / "study" / "nbody.yaml").read_text())
    assert "model.normalize=true" in study["common"]
