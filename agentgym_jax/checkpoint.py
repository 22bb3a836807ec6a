"""Orbax checkpoints of the whole training state: model/optimizer pytrees, step, RNG, data iterator.

Resume is automatic from the output dir. A corrupt or partial latest checkpoint is reported
loudly and the previous one is used. Nothing is ever deleted except by ``max_to_keep``: a step
that cannot be reused is renamed ``<step>.corrupt-<time>`` (or ``.superseded-``), and ``set_aside``
moves all steps into ``old-<time>/``; neither name is an orbax step, so neither counts as kept.
Leftover temporary folders of an interrupted save are removed at start-up.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# orbax writes ``<step>.orbax-checkpoint-tmp-<time>`` and renames it to ``<step>`` when complete.
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointCorruptError(RuntimeError):
    pass


class NoLoadableCheckpointError(RuntimeError):
    """Checkpoints exist but none loads into the target (changed shapes, or all damaged)."""


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, so restored arrays land where they live."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree.map(one, tree)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


# Advice in orbax's mismatch messages that does not apply here (we never pad or restore partly).
_ORBAX_ADVICE = (" Truncating/padding is disabled.", " If this mismatch is intentional")


def _short(e: BaseException, limit: int = 400) -> str:
    """One line of an exception; orbax's messages span many lines and whole trees."""
    text = " ".join(str(e).split())
    for advice in _ORBAX_ADVICE:
        text = text.split(advice)[0]
    return f"{type(e).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


class Checkpointer:
    """Saves ``{"state": pytree, "meta": json}`` every ``save_every`` steps under ``directory``.

    ``clean_tmp`` removes leftover ``*.orbax-checkpoint-tmp-*`` folders at start-up; pass False
    for a reader of a directory another process may be saving into.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int = 10,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        clean_tmp: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            # orbax accepts 0 and then deletes every checkpoint right after writing it.
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self.save_every = max(1, int(save_every))
        self._ours: set[int] = set()  # steps holding this run's state: written or loaded here
        self.failed: dict[int, str] = {}  # step -> why it did not load (last restore)
        self._barriers = itertools.count()
        os.makedirs(self.directory, exist_ok=True)
        self.removed_tmp = self._remove_tmp() if clean_tmp else []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # ---- filesystem housekeeping (process 0 acts, all processes wait) ----
    def _sync(self, what: str) -> None:
        ocp.multihost.sync_global_processes(f"agentgym_ckpt_{what}_{next(self._barriers)}")

    def _remove_tmp(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.directory) if TMP_MARK in n)
        if names and jax.process_index() == 0:
            for n in names:
                shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)
                log.warning(
                    "removed leftover temporary checkpoint folder %s (a save that never finished)",
                    os.path.join(self.directory, n),
                )
        self._sync("tmp")
        return names

    def _free_name(self, name: str) -> str:
        path, n = os.path.join(self.directory, name), 1
        while os.path.exists(path):
            path, n = os.path.join(self.directory, f"{name}.{n}"), n + 1
        return path

    def _rename_steps(self, moves: dict[int, str]) -> dict[int, str]:
        """Move step folders to the given paths; orbax no longer sees them afterwards."""
        self._mgr.wait_until_finished()  # no async save or max_to_keep deletion in flight
        if jax.process_index() == 0:
            for s, dst in moves.items():
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.rename(os.path.join(self.directory, str(s)), dst)
        self._sync("move")
        self._mgr.reload()
        return moves

    def set_aside(self) -> str | None:
        """Move every step into a new ``old-<time>/`` folder (start over, keep the old run).
        Returns that folder, or None when there was nothing to move."""
        steps = self.all_steps()
        if not steps:
            return None
        folder = self._free_name(f"old-{_stamp()}")
        self._rename_steps({s: os.path.join(folder, str(s)) for s in steps})
        log.warning("set aside checkpoint steps %s of %s into %s", steps, self.directory, folder)
        return folder

    # ---- steps ----
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def has_checkpoint(self, step: int) -> bool:
        """Whether ``step`` has a checkpoint this instance wrote (or queued) or loaded."""
        return step in self._ours and step in self._mgr.all_steps()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Queue a save (async); True if one was queued now. ``force`` saves even off the
        ``save_every`` grid (preemption). A step this instance already wrote or loaded is not
        written again (the state of a step is a function of the step).

        Steps on disk that this instance did not write or load, at or after ``step``, or that
        failed to load, belong to an abandoned run (e.g. the corrupt step resume fell back past):
        orbax cannot overwrite them and they would take ``max_to_keep`` places, so they are renamed
        out of orbax's step naming first.
        """
        if not force and not self.should_save(step):
            return False
        if step in self._ours and step in self._mgr.all_steps():
            return False
        stale = [
            s for s in self.all_steps() if s not in self._ours and (s >= step or s in self.failed)
        ]
        if stale:
            moves = {}
            for s in stale:
                tag = "corrupt" if s in self.failed else "superseded"
                moves[s] = self._free_name(f"{s}.{tag}-{_stamp()}")
            self._rename_steps(moves)
            for s, dst in moves.items():
                log.error(
                    "CHECKPOINT STEP %d IN %s %s; moved aside to %s before saving step %d",
                    s,
                    self.directory,
                    f"FAILED TO LOAD ({self.failed[s]})" if s in self.failed else "IS STALE",
                    dst,
                    step,
                )
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._ours.add(step)
        return True

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def restore(
        self, target: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restore ``step`` (default: newest that loads). Returns (step, state, meta) or None.

        ``target`` is a pytree like the saved state (its shardings are reused); ``partial`` lets it
        be a subtree (e.g. only the actor params, for export). A checkpoint that fails to load is
        logged as an error, recorded in ``failed`` and the next older one is tried.
        """
        if step is None:
            self.failed = {}
        steps = [step] if step is not None else sorted(self._mgr.all_steps(), reverse=True)
        abstract = _abstract(target)
        for s in steps:
            try:
                out = self._mgr.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            abstract,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                            partial_restore=partial,
                        ),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                state, meta = out["state"], out["meta"]
                if meta is None or int(meta.get("step", -1)) != s:
                    raise CheckpointCorruptError(f"metadata missing or inconsistent at step {s}")
                self._ours.add(s)
                return s, state, meta
            except Exception as e:  # orbax raises many types for damaged files
                if step is not None:
                    raise CheckpointCorruptError(
                        f"checkpoint step {s} in {self.directory} failed to load: {_short(e)}"
                    ) from e
                self.failed[s] = _short(e)
                log.error(
                    "CHECKPOINT AT STEP %d IN %s IS CORRUPT, INCOMPLETE OR DOES NOT MATCH (%s); "
                    "falling back to an older one. The files stay for inspection; the next save "
                    "moves them aside as <step>.corrupt-<time>.",
                    s,
                    self.directory,
                    self.failed[s],
                )
        return None

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
