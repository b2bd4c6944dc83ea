"""The run directory across stops and resumes: the metrics log and the engine checkpoints, as all ranks see them.

A checkpoint is saved by every rank (:meth:`Checkpoints.save`: the engine's files, a barrier, then rank 0
writes the manifest that completes it and prunes old ones). A run starts (:meth:`Checkpoints.start`) in
one of three ways, decided by rank 0 and told to every rank (``runtime.broadcast_text``), so that a bad
checkpoint stops all ranks with the same message instead of leaving some waiting:

* no ``resume``: the run directory must not hold a previous run (metrics.jsonl lines or checkpoints);
* ``resume=auto`` without a complete checkpoint: start from scratch;
* ``resume=auto`` with one: the newest complete checkpoint is verified (files against its manifest,
  configuration identity, the engine family that wrote it, the identity of the dataset store it trained
  on), then loaded by every rank.

Nothing in the run directory changes before that decision: a refused resume leaves it as it was. After a
successful one, rank 0 cuts metrics.jsonl back to the lines that existed when the checkpoint was written
(lines written after it, e.g. the test line of a finished run that is now continued with a larger
``trainer.max_epochs``, are appended to ``metrics.superseded.jsonl``), and removes leftovers of saves cut
short. So metrics.jsonl keeps one line per evaluation across any number of resumes, and its last line is
the test evaluation of the best model once the run finishes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from dist_egnn.parallel import runtime
from dist_egnn.training import checkpoint
from dist_egnn.training.checkpoint import CheckpointError


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and flushes it to disk at once (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.lines = len(self.read_lines()) if enabled else 0

    def read_lines(self) -> list[str]:
        """The complete lines (a last line cut short by a crash is not counted)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        return lines[:-1]                                  # after the last "\n": empty, or a torn line

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1

    def cut_to(self, lines: int) -> None:
        """Keep the first ``lines`` lines; move the rest to metrics.superseded.jsonl (both written safely)."""
        if not self.enabled:
            return
        text = self.path.read_text() if self.path.exists() else ""
        kept = self.read_lines()
        if len(kept) < lines:
            raise CheckpointError(f"{self.path} holds {len(kept)} complete lines but the checkpoint being resumed "
                                  f"was written after {lines}: the log was edited or belongs to another run; "
                                  f"restore it, or start a new run directory")
        rest = text[len("".join(line + "\n" for line in kept[:lines])):]
        if rest:
            with open(self.path.with_name("metrics.superseded.jsonl"), "a") as f:
                f.write(rest if rest.endswith("\n") else rest + "\n")
                f.flush()
                os.fsync(f.fileno())
            checkpoint.write_text_atomic("".join(line + "\n" for line in kept[:lines]), self.path)
        self.lines = lines


class Checkpoints:
    """The engine checkpoints of one run directory: ``checkpoints/engine/`` (resume points) and
    ``checkpoints/diagnostic/`` (written when training stops on non-finite numbers; never resumed from)."""

    def __init__(self, engine, run_dir: Path, config: dict[str, Any], keep_last: int, is_main: bool, device="cpu",
                 store: dict[str, Any] | None = None):
        self.engine, self.config, self.keep_last, self.is_main, self.device = engine, config, keep_last, is_main, device
        self.store = store                         # the dataset store's identity (datasets.prepare.store_identity)
        self.directory = Path(run_dir) / "checkpoints" / "engine"
        self.diagnostic_dir = Path(run_dir) / "checkpoints" / "diagnostic"
        self.hash = checkpoint.config_hash(config)
        self.resumed: Path | None = None          # the checkpoint this run continued from

    def save(self, tag: str, position: tuple[int, int], client: dict[str, Any], *, metrics_lines: int,
             keep: Iterable[str | None] = (), diagnostic: bool = False, **details: Any) -> Path:
        """Every rank calls it: the engine writes, then rank 0 completes the tag with its manifest and (regular
        checkpoints) deletes all but the newest ``keep_last`` and those in ``keep``. Returns the manifest path."""
        directory = self.diagnostic_dir if diagnostic else self.directory
        self.engine.save(directory, tag, client)
        runtime.barrier()                                       # every rank's files are on disk
        path = checkpoint.manifest_path(directory, tag)
        if self.is_main:
            if self.store is not None:
                details = dict(details, store=self.store)
            checkpoint.write_manifest(directory, tag, position=list(position), config_hash=self.hash,
                                      config=checkpoint.identity(self.config), metrics_lines=metrics_lines,
                                      engine=self.engine.name, **details)
            if not diagnostic:
                checkpoint.prune(directory, self.keep_last, keep=[k for k in keep if k])
        runtime.barrier()
        return path

    # -- starting a run ---------------------------------------------------------------------------------
    def start(self, mode: str | None, metrics: MetricsLog,
              check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Every rank calls it; returns the client state of the checkpoint resumed from, or None (fresh start).
        ``check(client)`` may refuse the loaded state (raise) before anything in the run directory changes."""
        verdict = ""
        if self.is_main:
            try:
                verdict = self.choose(mode, metrics)
            except CheckpointError as err:
                verdict = f"error:{err}"
        verdict = runtime.broadcast_text(verdict, device=self.device)
        if verdict.startswith("error:"):
            raise CheckpointError(verdict[len("error:"):])
        client, lines = None, 0
        if verdict:
            tag, lines = verdict.split("\n")
            checkpoint.check_tag(tag, self.directory)            # chosen from a checked manifest; checked again
            client = self.engine.load(self.directory, tag)
            self.resumed = self.directory / tag
            if client.get("schema_version", 0) > checkpoint.SCHEMA_VERSION:
                raise CheckpointError(f"{self.directory / tag}: trainer state schema_version "
                                      f"{client.get('schema_version')} is newer than this dist-egnn reads "
                                      f"({checkpoint.SCHEMA_VERSION}); upgrade dist-egnn")
            if check is not None:
                check(client)
        if self.is_main and mode:
            metrics.cut_to(int(lines))
            checkpoint.remove_leftovers(self.directory)
        runtime.barrier()
        return client

    def complete(self) -> list[dict[str, Any]]:
        return checkpoint.complete_checkpoints(self.directory) if self.directory.is_dir() else []

    def choose(self, mode: str | None, metrics: MetricsLog) -> str:
        """Rank 0: ``"<tag>\\n<metrics lines>"`` of the checkpoint to resume, or "" for a fresh start."""
        if mode not in (None, "auto"):
            raise CheckpointError(f"resume={mode!r}: only resume=auto is supported (or leave resume unset)")
        found = self.complete()
        if not mode:
            best = self.directory.parent / "best.pt"      # a model predict can use, even with no history beside it
            if metrics.read_lines() or found or best.exists():
                raise CheckpointError(f"run directory {self.directory.parents[1]} already holds a run "
                                      f"({metrics.path.name}: {len(metrics.read_lines())} lines, {len(found)} "
                                      f"checkpoints, best.pt {'present' if best.exists() else 'absent'}): continue "
                                      f"it with resume=auto, or choose another hydra.run.dir")
            return ""
        ignored = checkpoint.incomplete_tags(self.directory)
        if ignored:
            print(f"resume=auto: ignoring incomplete checkpoints (no manifest) {ignored} in {self.directory}",
                  file=sys.stderr)
        if not found:
            print(f"resume=auto: no complete checkpoint in {self.directory}, starting from scratch", file=sys.stderr)
            return ""
        newest = found[-1]
        checkpoint.verify(self.directory, newest, self.config)
        where = checkpoint.manifest_path(self.directory, newest["tag"])
        checkpoint.check_engine(where, newest, self.engine.name)
        checkpoint.check_store(where, newest, self.store)
        lines = metrics.read_lines()
        if len(lines) < newest["metrics_lines"]:
            raise CheckpointError(f"{metrics.path} holds {len(lines)} complete lines but checkpoint "
                                  f"{newest['tag']} was written after {newest['metrics_lines']}: the log was edited "
                                  f"or belongs to another run; restore it, or start a new run directory")
        return f"{newest['tag']}\n{newest['metrics_lines']}"
