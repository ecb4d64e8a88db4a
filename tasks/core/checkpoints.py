"""Trainer checkpoints that survive a kill: which folders are complete, and when old ones must go.

A stage that trains through the HF Trainer (train, align) checkpoints into `artifacts/<stage>/checkpoints/`
beside a fingerprint of what the checkpoints depend on. A rerun with the same fingerprint resumes from the
newest complete checkpoint; another fingerprint starts afresh.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.core.io import read_json, write_json

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder, None when it is incomplete.

    The Trainer writes `trainer_state.json` last (after weights, optimizer and RNG states), so a
    folder whose state file parses and names the folder's step was fully written. Its weights are
    checked too: a kill while the Trainer rotates old checkpoints out (rmtree) can leave a state
    file beside no weights.
    """
    try:
        step = int(path.name.rsplit("-", 1)[1])
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (IndexError, ValueError, OSError):
        return None
    # model/adapter safetensors, or DeepSpeed's own shards (ZeRO-3 without a gathered save)
    # (not any *.bin: every checkpoint holds training_args.bin)
    has_weights = any(any(path.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin", "global_step*"))
    return step if state.get("global_step") == step and has_weights else None


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder, or None."""
    done = [(checkpoint_step(p), p) for p in ckpt_dir.glob("checkpoint-*") if p.is_dir()]
    done = [(s, p) for s, p in done if s is not None]
    return max(done)[1] if done else None


def prepare_checkpoints(ckpt_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Keep checkpoints only when they were made from the same fingerprint (params, data, base model); drop
    incomplete ones."""
    fp_file = ckpt_dir / FINGERPRINT_FILE
    if ckpt_dir.exists():
        old = read_json(fp_file) if fp_file.exists() else None
        if old != fingerprint:
            if any(ckpt_dir.glob("checkpoint-*")):
                log.warning("params, data or base changed since the checkpoints in %s were made: starting afresh", ckpt_dir)
            shutil.rmtree(ckpt_dir)
        else:
            for p in ckpt_dir.glob("checkpoint-*"):
                if checkpoint_step(p) is None:
                    log.warning("removing incomplete checkpoint %s (the run was killed while saving it)", p)
                    shutil.rmtree(p)
    write_json(fp_file, fingerprint)


def finished_state(checkpoint: Path | None) -> dict[str, Any] | None:
    """The trainer state of a checkpoint that already holds the last training step, else None."""
    if checkpoint is None:
        return None
    state = read_json(checkpoint / "trainer_state.json")
    return state if state.get("max_steps") and state["global_step"] >= state["max_steps"] else None
