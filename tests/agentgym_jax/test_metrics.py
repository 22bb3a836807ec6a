"""MetricsLogger sinks: the Weights & Biases logger (offline) and its missing-package error."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import pytest

from agentgym_jax import metrics as M
from agentgym_jax.config import load_config
from agentgym_jax.config_tree import ConfigError


def read_wandb_records(path: str) -> list:
    """Records of an offline ``.wandb`` file: a 7-byte header, then a LevelDB-style log (32 KiB
    blocks; each chunk: crc32c u32, length u16, type u8 with 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep $HOME clean
        monkeypatch.setenv(k, str(tmp_path / "wandb_home"))
    out = tmp_path / "my_run"
    logger = M.MetricsLogger(str(out), loggers=["jsonl", "wandb"], total_steps=3)
    steps = {1: 0.25, 2: 0.5, 3: 0.75}
    for step, r in steps.items():
        logger.log(step, {"train/reward_mean": r, "train/horizon": 2 * step, "note": "text"})
    logger.close()

    assert [r["train/reward_mean"] for r in M.read_jsonl(str(out / "metrics.jsonl"))] == [
        0.25,
        0.5,
        0.75,
    ]
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(out / "wandb")
    (path,) = glob.glob(os.path.join(runs[0], "*.wandb"))
    records = read_wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "agentgym-jax" and run.display_name == "my_run"
    assert run.run_id == (out / "wandb_run_id").read_text().strip()
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item
            }
            history[row["_step"]] = row
    assert sorted(history) == [1, 2, 3]
    for step, r in steps.items():
        assert history[step]["train/reward_mean"] == r
        assert history[step]["train/horizon"] == 2 * step
        assert "note" not in history[step]  # only scalars are logged


def test_wandb_missing_fails_early_with_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'agentgym-jax\[wandb\]'"):
        M.MetricsLogger(str(tmp_path), loggers=["jsonl", "wandb"])
    with pytest.raises(ConfigError, match=r"pip install 'agentgym-jax\[wandb\]'"):
        load_config(None, ["trainer.logger=[console, wandb]"])
    load_config(None, ["trainer.logger=[console, jsonl]"])  # others unaffected
