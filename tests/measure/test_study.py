"""`python launch/study.py`: runs every (label, seed), writes JSON/Markdown/PNG results, resumes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_egnn.datasets.store import StoreError
from dist_egnn.errors import ConfigError
from dist_egnn.measure.reporting import markdown_table, relative_change, summarise

ROOT = Path(__file__).resolve().parents[2]
TINY_STUDY = """
name: tiny
description: two models on a tiny N-body set
dataset: nbody_small
baseline: egnn
seeds: [0, 1]
common: [dataset.nbody.num_particles=8, dataset.nbody.train=4, dataset.nbody.val=2, dataset.nbody.test=2,
         dataset.nbody.steps=1100, dataset.frame_start=0, dataset.frame_stop=1, trainer.num_threads=1]
budgets:
  default: [trainer.max_epochs=1, trainer.batch_size=2]
runs:
  - {label: egnn, overrides: [model=egnn]}
  - {label: fastegnn, overrides: [model=fastegnn]}
"""


def run_study(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "conf" / "study"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "tiny.yaml").write_text(TINY_STUDY)
    return run_study_file(tmp_path, *extra)


def test_study_writes_records_table_and_plot_and_resumes(tmp_path):
    proc = run_study(tmp_path, "jobs=2")                     # two runs at once
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "results" / "tiny.json").read_text())
    # seed-major: every label's first seed before any second seed, whichever of two parallel runs finished first
    assert [(r["label"], r["seed"]) for r in records] == [("egnn", 0), ("fastegnn", 0), ("egnn", 1), ("fastegnn", 1)]
    # the tiny study's common overrides set trainer.num_threads=1 themselves: jobs does not add a second value
    assert proc.stdout.count("trainer.num_threads=") == 4
    for r in records:
        assert {"study", "dataset", "model", "seed", "test_mse", "cutoff_rate", "parts", "halo"} <= set(r)
        assert r["study"] == "tiny" and r["dataset"] == "nbody_small" and r["test_mse"] > 0
        assert r["dropped_edge_fraction"] == 0.0 and r["edges_per_rank"] > 0     # complete graph, r = 0
    assert {r["model"] for r in records} == {"egnn", "fastegnn"}
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "| fastegnn |" in table and "vs egnn" in table and "| dropped edges |" in table and "| 0.0% |" in table
    assert (tmp_path / "results" / "tiny.png").stat().st_size > 1000
    trivial = json.loads((tmp_path / "results" / "tiny-trivial.json").read_text())
    assert trivial["dataset"] == "nbody_small" and trivial["constant_velocity_mse"] < trivial["zero_motion_mse"]
    assert "constant velocity" in table

    # The trivial references are kept with the dataset settings they were computed for; stale ones are redone.
    stale = dict(trivial, dataset_config=dict(trivial["dataset_config"], velocity_unit="horizon"),
                 constant_velocity_mse=-1.0)
    (tmp_path / "results" / "tiny-trivial.json").write_text(json.dumps(stale))
    assert run_study(tmp_path, "train=false").returncode == 0
    assert json.loads((tmp_path / "results" / "tiny-trivial.json").read_text()) == trivial
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == records

    # A run cut short after its last checkpoint (no test line yet) resumes instead of starting over; the finished
    # runs are not retrained (started again, a study retrains nothing finished) and their records stay as they were.
    metrics = Path(records[-1]["run_dir"]) / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    resumed = run_study(tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume=auto" in resumed.stdout + resumed.stderr and resumed.stdout.count("running ") == 1
    assert f"running {records[-1]['label']} seed {records[-1]['seed']}:" in resumed.stdout
    again_records = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert again_records[:-1] == records[:-1]
    assert again_records[-1]["test_mse"] == records[-1]["test_mse"]
    # everything each run's processes printed is kept in its folder; a resumed run adds to it
    output = (Path(records[-1]["run_dir"]) / "study_output.log").read_text()
    assert output.count("$ ") == 2 and output.count("launch/train.py") == 2 and "resume=auto" in output

    # study.rollout_steps: finished runs are not retrained, only rolled out (launch/predict.py), once.
    rolled = run_study(tmp_path, "study.rollout_steps=2", "jobs=2")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    out = rolled.stdout + rolled.stderr
    assert "running " not in out and out.count("rolling out ") == 4 and "launch/predict.py" in out
    records = json.loads((tmp_path / "results" / "tiny.json").read_text())
    for r in records:
        assert 1 <= len(r["rollout_mse"]) == len(r["rollout_baseline_mse"]) <= 2
        assert json.loads((Path(r["run_dir"]) / "predict" / "rollout.json").read_text())["mse"] == r["rollout_mse"]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "Rollouts: 2 task steps" in table and "| egnn: const. vel. | 2 |" in table and " of " in table
    assert (tmp_path / "results" / "tiny-rollout.png").stat().st_size > 1000
    done = run_study(tmp_path, "study.rollout_steps=2")                  # everything done: nothing again
    assert done.returncode == 0 and "running" not in done.stdout + done.stderr and "rolling out" not in done.stdout
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == records
    # started for some seeds only, a study tabulates every finished seed on disk: its results never shrink
    subset = run_study(tmp_path, "study.seeds=[1]", "study.rollout_steps=2", "train=false")
    assert subset.returncode == 0, subset.stdout + subset.stderr
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == records
    assert "seeds [0, 1]" in (tmp_path / "results" / "tiny.md").read_text()
    # the study's overrides edited after its runs finished: their results are not written under the new settings
    (tmp_path / "conf" / "study" / "tiny.yaml").write_text(
        TINY_STUDY.replace("trainer.num_threads=1]", "trainer.num_threads=1, trainer.lr=2.0e-3]"))
    edited = run_study_file(tmp_path, "study.rollout_steps=2", "train=false")
    out = edited.stdout + edited.stderr
    assert edited.returncode != 0 and "4 finished run(s) of study tiny were trained with other overrides" in out
    assert "egnn/seed0: now asked for trainer.lr=2.0e-3" in out and "delete those run folders" in out
    # also when started for another seed only: the results would hold the old seeds beside it
    other_seed = run_study_file(tmp_path, "study.seeds=[2]", "train=false")
    assert other_seed.returncode != 0 and "4 finished run(s)" in other_seed.stdout + other_seed.stderr
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == records


def test_scene_rollouts_roll_every_scene_out_alone_and_count_the_whole_ones(tmp_path):
    """study.scene_rollouts: each scene of the splits is rolled out by itself (predict scene_ids=[i]) with the
    study's K; the records hold every scene's outcome and the md counts them; started again, nothing is redone.
    guards: one diverging scene hiding how the others did (a split-wide rollout stops there)."""
    conf = tmp_path / "conf" / "study"
    conf.mkdir(parents=True)
    study = TINY_STUDY.replace("seeds: [0, 1]", "seeds: [0]").replace("baseline: egnn\n", "")
    study = study.replace("dataset.nbody.val=2", "dataset.nbody.val=1").split("runs:")[0]
    study += "runs:\n  - {label: fastegnn, overrides: [model=fastegnn]}\nrollout_steps: 1\n"
    (conf / "tiny.yaml").write_text(study + "scene_rollouts: {splits: [test, val]}\n")
    proc = run_study_file(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("on test scene") == 2 and proc.stdout.count("on val scene") == 1
    [record] = json.loads((tmp_path / "results" / "tiny.json").read_text())
    scenes = record["scene_rollouts"]
    assert [(s["split"], s["scene"]) for s in scenes] == [("test", 0), ("test", 1), ("val", 0)]
    run_dir = Path(record["run_dir"])
    for s in scenes:
        alone = json.loads((run_dir / "scene_rollouts" / f"{s['split']}-{s['scene']}" / "rollout.json").read_text())
        assert alone["scenes"] == [s["scene"]] and alone["requested_steps"] == 1 == s["requested_steps"]
        assert s["mse_last"] == alone["mse"][-1] and s["baseline_mse_last"] == alone["baseline_mse"][-1]
    # the two test scenes alone hold the same nodes as the split-wide rollout: its MSE is their mean (equal sizes)
    whole = json.loads((run_dir / "predict" / "rollout.json").read_text())
    assert np.mean([s["mse_last"] for s in scenes[:2]]) == pytest.approx(whole["mse"][-1], rel=1e-5)
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "Scene by scene" in table, table
    assert "| fastegnn | test | 1 | 2 | 2 |" in table and "| fastegnn | val | 1 | 1 | 1 |" in table, table
    assert all(s["outside_last"] is None for s in scenes)                      # N-body: no walls
    assert (tmp_path / "results" / "tiny-scenes.png").stat().st_size > 1000
    again = run_study_file(tmp_path)
    assert again.returncode == 0 and "rolling out" not in again.stdout + again.stderr
    # tabulating (train=false) reads the run folders: the results are written again without the store
    (tmp_path / "data").rename(tmp_path / "elsewhere")
    (tmp_path / "results" / "tiny.md").unlink()
    tabulated = run_study_file(tmp_path, "train=false")
    assert tabulated.returncode == 0, tabulated.stdout + tabulated.stderr
    assert (tmp_path / "results" / "tiny.md").read_text() == table


def test_scene_rollouts_need_rollout_steps_known_splits_and_a_store_that_holds_them(tmp_path):
    from omegaconf import OmegaConf

    from dist_egnn.measure.study import check_scene_rollouts

    def spec(**scenes):
        return OmegaConf.create({"rollout_steps": 2, "scene_rollouts": {"data": None, "splits": ["test"], **scenes}})

    check_scene_rollouts(spec(), str(tmp_path))
    with pytest.raises(ConfigError, match="set study.rollout_steps=K too"):
        check_scene_rollouts(OmegaConf.merge(spec(), {"rollout_steps": None}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"splits=\['holdout'\]: give one or more of"):
        check_scene_rollouts(spec(splits=["holdout"]), str(tmp_path))
    with pytest.raises(ConfigError, match="each once"):
        check_scene_rollouts(spec(splits=["test", "test"]), str(tmp_path))
    with pytest.raises(StoreError, match="absent.zarr does not exist"):
        check_scene_rollouts(spec(data="absent"), str(tmp_path))
    check_scene_rollouts(spec(data="absent"), str(tmp_path), train=False)       # tabulating reads the run folders


def test_scene_table_counts_whole_and_below_and_the_picture_takes_a_zero_baseline(tmp_path):
    """guards: a stopped scene counted as whole, "below" counted on stopped ones, a baseline of 0 (fluid at rest)
    ending the results with a ZeroDivisionError."""
    from omegaconf import OmegaConf

    from dist_egnn.measure.study import scene_plot, scene_table

    def scene(split, i, steps, stopped=None, mse=1.0, base=2.0):
        return dict(split=split, scene=i, steps=steps, requested_steps=5, stopped=stopped, mse_last=mse,
                    baseline_mse_last=base, steps_below=0, outside_last=0.015 if (i, base) == (1, 2.0) else None)

    records = [dict(label="a", seed=0, scene_rollouts=[scene("test", 0, 5), scene("test", 1, 5, mse=3.0),
                                                       scene("val", 0, 2, stopped="stopped after 2 of 5 steps: NaN")]),
               dict(label="a", seed=1, scene_rollouts=[scene("test", 0, 5, mse=0.5, base=0.0), scene("test", 1, 5)])]
    spec = OmegaConf.create({"rollout_steps": 5, "rollout_start": 1,
                             "scene_rollouts": {"data": "eval", "splits": ["test", "val"]}})
    table = scene_table(spec, records, "s")
    assert "| a | test | 2 | 4 | 4 | 2 | 1.5 %, 1.5 % |" in table and "| a | val | 1 | 1 | 0 | 0 | - |" in table, table
    assert "- a seed 0, val scene 0: stopped after 2 of 5 steps: NaN" in table
    assert scene_plot(records, tmp_path / "s.png", "s").stat().st_size > 1000


def test_train_false_tabulates_finished_runs_only(tmp_path):
    proc = run_study(tmp_path, "train=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping egnn seed 0" in proc.stdout + proc.stderr and "nothing written" in proc.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_a_failed_run_stops_the_study_or_with_keep_going_is_listed_and_retried(tmp_path):
    conf = tmp_path / "conf" / "study"
    conf.mkdir(parents=True)
    # a run whose launch fails (a refused learning rate: exit 2) beside one that trains
    (conf / "tiny.yaml").write_text(TINY_STUDY + "  - {label: broken, overrides: [trainer.lr=-1.0]}\n")
    one_seed = "study.seeds=[0]"
    stopped = run_study_file(tmp_path, one_seed)
    assert stopped.returncode != 0 and "run broken seed 0 failed" in stopped.stdout + stopped.stderr
    failed_file = tmp_path / "runs" / "studies" / "tiny-default" / "broken" / "seed0" / "study_failed.txt"
    assert "trainer.lr" in failed_file.read_text()
    assert "trainer.lr" in (failed_file.parent / "study_output.log").read_text()     # its error, also kept

    going = run_study_file(tmp_path, one_seed, "keep_going=true", "jobs=2")
    out = going.stdout + going.stderr
    assert going.returncode == 1 and "1 run(s) failed" in out and "the other runs go on" in out
    records = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert [r["label"] for r in records] == ["egnn", "fastegnn"]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "Runs that failed" in table and "- broken seed 0: error" in table and "trainer.lr" in table

    # fixed (here: the label trains now), the study retries it and the failure leaves the table
    (conf / "tiny.yaml").write_text(TINY_STUDY + "  - {label: broken, overrides: [trainer.lr=1.0e-3]}\n")
    fixed = run_study_file(tmp_path, one_seed, "keep_going=true")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert not failed_file.exists() and "Runs that failed" not in (tmp_path / "results" / "tiny.md").read_text()


def run_study_file(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """As run_study, with the study file already written in tmp_path/conf/study/tiny.yaml."""
    cmd = [sys.executable, str(ROOT / "launch" / "study.py"), "--config-dir", str(tmp_path / "conf"), "study=tiny",
           f"paths.data={tmp_path / 'data'}", f"paths.runs={tmp_path / 'runs'}",
           f"results_dir={tmp_path / 'results'}", "progress=false", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_unknown_budget_is_a_clear_error(tmp_path):
    proc = run_study(tmp_path, "study.budget=huge")
    assert proc.returncode != 0 and "study.budget='huge'" in proc.stdout + proc.stderr


def test_summary_statistics_and_relative_change():
    records = [dict(label="a", test_mse=1.0), dict(label="a", test_mse=3.0), dict(label="b", test_mse=1.4)]
    rows = summarise(records)
    assert rows[0] == dict(group="a", n=2, mean=2.0, std=pytest.approx(2 ** 0.5), min=1.0, max=3.0, by_seed={})
    assert rows[1]["std"] == 0.0
    assert relative_change(1.4, 2.0) == pytest.approx(-0.3)
    assert "-30.0%" in markdown_table(rows, baseline="a")


def test_a_run_with_fewer_seeds_is_compared_on_its_own_seeds():
    """Baseline seeds 0 and 1 (mean 2.0), the run seed 0 only: compared with the baseline's seed 0 (1.0), not
    with its two-seed mean, which made an equal result read +7 % in docs/results/fluid.md."""
    records = [dict(label="a", seed=0, test_mse=1.0), dict(label="a", seed=1, test_mse=3.0),
               dict(label="b", seed=0, test_mse=1.0)]
    table = markdown_table(summarise(records), baseline="a")
    assert "vs a (same seeds)" in table and "| +0.0% |" in table.splitlines()[-1]


@pytest.mark.parametrize("bad", ["jobs=0", "study.rollout_steps=0", "study.rollout_start=-1"])
def test_jobs_or_rollout_steps_below_one_are_refused(tmp_path, bad):
    proc = run_study(tmp_path, bad)
    assert proc.returncode != 0 and bad in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_train_command_gives_each_job_its_share_of_the_cores():
    from omegaconf import OmegaConf

    from dist_egnn.measure.study import train_command
    spec = OmegaConf.create({"name": "s", "dataset": "nbody", "common": [], "budget": "default",
                             "budgets": {"default": ["trainer.max_epochs=1"]}})
    one_rank = OmegaConf.create({"label": "a", "overrides": [], "ranks": 1})
    two_ranks = OmegaConf.create({"label": "b", "overrides": [], "ranks": 2})
    own = OmegaConf.create({"label": "c", "overrides": ["trainer.num_threads=3"], "ranks": 1})
    assert "trainer.num_threads=4" in train_command(spec, one_rank, 0, Path("r"), "data", threads=4)
    assert "trainer.num_threads=2" in train_command(spec, two_ranks, 0, Path("r"), "data", threads=4)
    command = train_command(spec, own, 0, Path("r"), "data", threads=4)
    assert [o for o in command if o.startswith("trainer.num_threads")] == ["trainer.num_threads=3"]
    assert not any(o.startswith("trainer.num_threads") for o in train_command(spec, one_rank, 0, Path("r"), "data"))


def test_rollout_table_means_over_seeds_counts_steps_below_and_names_stopped_rollouts():
    from dist_egnn.measure.study import rollout_table
    records = [dict(label="a", seed=0, rollout_mse=[1.0, 4.0], rollout_baseline_mse=[2.0, 3.0]),
               dict(label="a", seed=1, rollout_mse=[2.0], rollout_baseline_mse=[2.0],
                    rollout_stopped="stopped after 1"),
               dict(label="b", seed=0, test_mse=1.0)]                     # trained, not rolled out: no row
    table = rollout_table(records, 2)       # step 2 is the mean of the one seed that reached it
    assert "| a | 2 | 1.5 | 4 | 1 of 2 |" in table and "| a: const. vel. | 2 | 2 | 3 | |" in table
    assert "| b |" not in table and "- a seed 1: stopped after 1" in table
    assert rollout_table([records[2]], 2) == ""
    assert "edges per moving node" not in table                          # records from before the key
    records[0]["rollout_edges_per_node"], records[1]["rollout_edges_per_node"] = [10.0, 24.0], [12.0]
    records[0]["rollout_spread_ratio"] = [0.9, 0.2]
    table = rollout_table(records, 2)
    assert "| a: edges per moving node | 2 | 11 | 24 | |" in table
    assert "| a: spread pred / true | 2 | 0.9 | 0.2 | |" in table
    assert "further options" not in table
    records[1]["rollout_command"] = "python launch/predict.py run=R steps=2 max_neighbors=24 num_threads=1"
    assert "- `max_neighbors=24`: a seed 1" in rollout_table(records, 2)


def test_a_long_rollout_table_shows_every_nth_step_and_the_last_and_names_its_start_frame():
    """A Δt = 1 rollout of 100 steps would be a 100-column table: one step in 5 is shown, and the last; the count
    of steps below constant velocity still covers every step. rollout_start is named in the header and is not
    listed as a further option."""
    from dist_egnn.measure.study import TABLE_COLUMNS, rollout_table, table_steps
    assert table_steps(10) == list(range(1, 11)) and table_steps(TABLE_COLUMNS) == list(range(1, TABLE_COLUMNS + 1))
    assert table_steps(100) == list(range(5, 101, 5)) and table_steps(101) == [*range(6, 101, 6), 101]
    mse = [0.5] * 99 + [3.0]
    records = [dict(label="a", seed=0, rollout_mse=mse, rollout_baseline_mse=[1.0] * 100,
                    rollout_command="python launch/predict.py run=R steps=100 start=0 num_threads=1")]
    table = rollout_table(records, 100, start=0)
    assert "from input frame 0" in table and "steps=100 start=0`" in table and "one step in 5 shown" in table
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    assert header.count("step ") == 20 and "| step 5 | step 10 |" in header and "| step 100 |" in header
    assert "| a | 1 | " + " | ".join(["0.5"] * 19 + ["3"]) + " | 99 of 100 |" in table
    assert "further options" not in table
    assert "- `start=0`: a seed 0" in rollout_table(records, 100)          # a hand rollout from another frame


def test_rollout_start_reaches_predict_and_a_rollout_from_another_frame_is_redone(tmp_path):
    import json as _json

    from omegaconf import OmegaConf

    from dist_egnn.measure.study import predict_command, rollout_record
    spec = OmegaConf.create({"rollout_steps": 3, "rollout_start": 0})
    assert "start=0" in predict_command(spec, tmp_path, threads=1)
    assert not any(w.startswith("start=") for w in predict_command(OmegaConf.create({"rollout_steps": 3}), tmp_path))
    (tmp_path / "predict").mkdir()
    (tmp_path / "predict" / "rollout.json").write_text(_json.dumps({"requested_steps": 3, "start_frame": 10}))
    assert rollout_record(spec, tmp_path) is None                                  # from frame 10: roll out again
    assert rollout_record(OmegaConf.create({"rollout_steps": 3}), tmp_path) is not None
    (tmp_path / "predict" / "rollout.json").write_text(_json.dumps({"requested_steps": 3, "start_frame": 0}))
    assert rollout_record(spec, tmp_path) is not None
    # predict's default out= is the same folder: a rollout of another split or of some scenes is not the study's
    for other in ({"split": "val"}, {"config": {"scene_ids": [3]}}, {"config": {"scenes": 1}}):
        (tmp_path / "predict" / "rollout.json").write_text(_json.dumps({"requested_steps": 3, "start_frame": 0,
                                                                         **other}))
        assert rollout_record(spec, tmp_path) is None, other
