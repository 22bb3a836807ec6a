"""Orbax checkpoints of the whole training state: model/optimizer pytrees, step, RNG, data iterator.

Resume is automatic from the output dir. A corrupt or partial latest checkpoint is reported
loudly and the previous one is used; nothing is deleted on the way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointCorruptError(RuntimeError):
    pass


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, so restored arrays land where they live."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves ``{"state": pytree, "meta": json}`` every ``save_every`` steps under ``directory``."""

    def __init__(
        self,
        directory: str,
        *,
        save_every: int = 10,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.save_every = max(1, int(save_every))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Queue a save (async). ``force`` saves even off the ``save_every`` grid (preemption)."""
        if step in self._mgr.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        return True

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def restore(
        self, target: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restore ``step`` (default: newest that loads). Returns (step, state, meta) or None.

        ``target`` is a pytree like the saved state (its shardings are reused); ``partial`` lets it
        be a subtree (e.g. only the actor params, for export). A checkpoint that fails to load is
        logged as an error and the next older one is tried.
        """
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
                return s, state, meta
            except Exception as e:  # orbax raises many types for damaged files
                if step is not None:
                    raise CheckpointCorruptError(
                        f"checkpoint step {s} in {self.directory} failed to load: {e}"
                    ) from e
                log.error(
                    "CHECKPOINT AT STEP %d IN %s IS CORRUPT OR INCOMPLETE (%s: %s); falling back to an "
                    "older one. The damaged files are left in place for inspection.",
                    s,
                    self.directory,
                    type(e).__name__,
                    str(e)[:300],
                )
        return None

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
