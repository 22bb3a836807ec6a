"""Checkpointer faults: corrupt steps, max_to_keep, leftover temporary folders, unloadable runs."""

import logging
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.checkpoint import CheckpointCorruptError, Checkpointer
from agentgym_jax.config import ConfigError, load_config


def tree(v: float, n: int = 4) -> dict:
    # jax arrays, as in training: orbax checks their shapes (numpy leaves load as saved).
    return {"w": jnp.full((n,), v, jnp.float32), "b": {"x": jnp.full((2, n), -v, jnp.float32)}}


def ckpt(directory, **kw) -> Checkpointer:
    kw.setdefault("save_every", 1)
    return Checkpointer(str(directory), async_save=False, **kw)


def write_steps(directory, steps, **kw) -> None:
    ck = ckpt(directory, **kw)
    try:
        for s in steps:
            assert ck.save(s, tree(float(s)), {"step": s})
    finally:
        ck.close()


def damage(directory, step) -> None:
    for root, _, files in os.walk(os.path.join(str(directory), str(step), "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


def entries(directory) -> list[str]:
    return sorted(os.listdir(str(directory)))


def test_corrupt_latest_is_set_aside_when_its_step_is_saved_again(tmp_path, caplog):
    write_steps(tmp_path, [1, 2])
    damage(tmp_path, 2)
    ck = ckpt(tmp_path)
    try:
        with caplog.at_level(logging.ERROR):
            step, _, _ = ck.restore(tree(0.0))
        assert step == 1 and "CORRUPT" in caplog.text and set(ck.failed) == {2}
        # The retrained step 2 (e.g. a forced save on SIGTERM) must really be written.
        assert ck.save(2, tree(22.0), {"step": 2}, force=True)
        assert ck.has_checkpoint(2)
        assert not ck.save(2, tree(23.0), {"step": 2}, force=True)  # already this run's
        assert ck.all_steps() == [1, 2]
    finally:
        ck.close()
    aside = [e for e in entries(tmp_path) if e.startswith("2.corrupt-")]
    assert len(aside) == 1 and "moved aside" in caplog.text  # kept for inspection
    assert os.path.isdir(os.path.join(tmp_path, aside[0], "state"))
    ck = ckpt(tmp_path)
    try:
        step, state, _ = ck.restore(tree(0.0))
    finally:
        ck.close()
    assert step == 2
    np.testing.assert_array_equal(state["w"], tree(22.0)["w"])


def test_corrupt_step_takes_no_max_to_keep_place(tmp_path):
    write_steps(tmp_path, [10, 20], max_to_keep=2)
    damage(tmp_path, 20)
    ck = ckpt(tmp_path, max_to_keep=2)
    try:
        assert ck.restore(tree(0.0))[0] == 10
        assert ck.save(15, tree(15.0), {"step": 15}, force=True)  # preempted before step 20
    finally:
        ck.close()
    # Without setting 20 aside, orbax keeps {15, corrupt 20} and deletes the good 10.
    ck = ckpt(tmp_path, max_to_keep=2)
    try:
        assert ck.all_steps() == [10, 15]
        assert ck.restore(tree(0.0), 10)[0] == 10
    finally:
        ck.close()


def test_newer_step_of_an_abandoned_run_is_set_aside_not_overwritten(tmp_path):
    write_steps(tmp_path, [1, 2, 3])
    ck = ckpt(tmp_path)
    try:
        assert ck.restore(tree(0.0), 1)[0] == 1  # e.g. an explicit older step
        assert ck.save(2, tree(-2.0), {"step": 2})
        assert ck.all_steps() == [1, 2]
    finally:
        ck.close()
    names = entries(tmp_path)
    assert any(n.startswith("2.superseded-") for n in names)
    assert any(n.startswith("3.superseded-") for n in names)


def test_set_aside_moves_every_step_into_a_timestamped_folder(tmp_path):
    write_steps(tmp_path, [1, 2])
    ck = ckpt(tmp_path)
    try:
        folder = ck.set_aside()
        assert ck.all_steps() == [] and ck.restore(tree(0.0)) is None
        assert ck.save(1, tree(5.0), {"step": 1})
    finally:
        ck.close()
    assert os.path.basename(folder).startswith("old-")
    assert sorted(os.listdir(folder)) == ["1", "2"]
    ck = ckpt(tmp_path)
    try:
        assert ck.all_steps() == [1]  # the folder is not an orbax step
        np.testing.assert_array_equal(ck.restore(tree(0.0))[1]["w"], tree(5.0)["w"])
    finally:
        ck.close()


def test_shape_mismatch_records_why_nothing_loads(tmp_path):
    write_steps(tmp_path, [1, 2])
    ck = ckpt(tmp_path)
    try:
        assert ck.restore(tree(0.0, n=8)) is None
        assert set(ck.failed) == {1, 2}
        # Shortened to the mismatch itself: orbax's advice about padding is cut.
        pattern = (
            r"ValueError: Requested shape: \(.+\) is not compatible with the stored shape: \(.+\)\."
        )
        assert re.fullmatch(pattern, ck.failed[2]), ck.failed[2]
        with pytest.raises(CheckpointCorruptError):
            ck.restore(tree(0.0, n=8), 2)
    finally:
        ck.close()
    assert entries(tmp_path).count("2") == 1  # nothing moved by a failed restore


def test_leftover_tmp_folders_are_removed_at_startup(tmp_path, caplog):
    write_steps(tmp_path, [1])
    # What a save killed midway leaves behind: a step's files under orbax's tmp name.
    tmp = os.path.join(tmp_path, "2.orbax-checkpoint-tmp-1733256000123456")
    shutil.copytree(os.path.join(tmp_path, "1"), tmp)
    with caplog.at_level(logging.WARNING):
        ck = ckpt(tmp_path)
    try:
        assert ck.removed_tmp == [os.path.basename(tmp)]
        assert not os.path.exists(tmp) and os.path.basename(tmp) in caplog.text
        assert ck.all_steps() == [1]
        assert ck.save(2, tree(2.0), {"step": 2})
    finally:
        ck.close()
    assert entries(tmp_path).count("2") == 1


def test_max_to_keep_below_one_is_rejected_and_none_keeps_all(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(str(tmp_path / "a"), max_to_keep=0)
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="trainer.max_to_keep"):
            load_config(None, [f"trainer.max_to_keep={bad}"])
    assert load_config(None, ["trainer.max_to_keep=null"]).trainer.max_to_keep is None
    write_steps(tmp_path / "b", [1, 2, 3, 4, 5], max_to_keep=None)
    ck = ckpt(tmp_path / "b", max_to_keep=None)
    try:
        assert ck.all_steps() == [1, 2, 3, 4, 5]
    finally:
        ck.close()


def test_resume_mode_is_validated():
    assert load_config(None, []).trainer.resume == "auto"
    assert load_config(None, ["trainer.resume=never"]).trainer.resume == "never"
    with pytest.raises(ConfigError, match="'auto', 'never'"):
        load_config(None, ["trainer.resume=always"])
