"""Process setup for training: the single-process distributed environment and the torchrun relaunch.

`sftflow train` with `train.num_processes: N > 1` starts itself again as N ranks:

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.cli train --params PARAMS.yaml

Each rank loads the resolved params that the parent wrote and calls the stage's `run`, which sees
`WORLD_SIZE` in its environment and trains instead of relaunching (gloo on CPU, nccl on GPU).
Ranks other than 0 log warnings only (`tasks.cli`).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.core.errors import StageError
from tasks.core.io import usable_cores
from tasks.core.stage_params import StageParams

log = logging.getLogger(__name__)

# Set in the ranks this module starts, so they know their parent already prepared the stage folder.
LAUNCHED_ENV = "SFTFLOW_LAUNCHED"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed_env() -> None:
    """Give a lone process the rank variables DeepSpeed reads (it initialises torch.distributed even for one rank)."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            # A fixed port would collide with a second run (or test) on the same machine.
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port())),
        }
    )


def deepspeed_plan(config: Path | None, world_size: int) -> tuple[bool, str]:
    """Whether a training run goes through DeepSpeed, and why: only where it buys something.

    ZeRO splits the optimizer state and gradients (stage 2) and the parameters (stage 3) over the
    ranks, so with several ranks it saves memory; offloading (`offload_optimizer` / `offload_param`
    to the CPU or NVMe) saves GPU memory even on one. One rank without offload has nothing to split:
    the same training as the plain Trainer plus DeepSpeed's bookkeeping (bucketing, flat copies of the
    gradients: 1-7% slower per CPU-second across `make bench` runs), so it runs the plain Trainer. Its result is
    the same model: both are the Trainer's AdamW on fp32 master weights.

    Args:
        config: `train.deepspeed_config` (None: no DeepSpeed).
        world_size: the ranks this run trains on.

    Returns:
        (use DeepSpeed, the reason in words), recorded in `metrics/train.json`.
    """
    import json

    if config is None:
        return False, "train.deepspeed_config is null"
    zero = json.loads(Path(config).read_text(encoding="utf-8")).get("zero_optimization", {})
    offload = [key for key in ("offload_optimizer", "offload_param")
               if (zero.get(key) or {}).get("device", "none") not in ("none", None)]
    if world_size > 1:
        return True, f"{world_size} ranks: ZeRO stage {zero.get('stage', 0)} splits the training state over them"
    if offload:
        return True, f"one rank, {' and '.join(offload)} on: DeepSpeed moves that state off the device"
    return False, ("one rank without offload: ZeRO has nothing to split, so the plain Trainer trains (the same "
                   "optimizer and weights, without DeepSpeed's bookkeeping)")


def init_deepspeed_comm() -> None:
    """Start DeepSpeed's communication layer on the process group torch already has (gloo on CPU, nccl on
    GPU): `deepspeed.zero.Init`, which builds a ZeRO-3 model partitioned, counts the ranks through it."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def threads_per_rank(configured: int, ranks: int) -> int:
    """Torch threads for each rank: `configured`, else this process's cores / ranks.

    Never the environment (OMP_NUM_THREADS): how torch splits an op among threads decides which
    elements take the vectorised path and which the scalar tail, so the thread count changes the
    last bits of activations and gradients, and then the trained weights. A stage run by the flow (or a
    test, a benchmark) with OMP_NUM_THREADS=1 and the same stage run from a plain shell would train
    different models from the same inputs. The count is `train.torch_threads` or follows the machine.
    """
    if configured:
        return configured
    return max(1, usable_cores() // max(1, ranks))


def is_rank_zero() -> bool:
    """True in the process that writes outputs (rank 0, or a process outside any launcher)."""
    return os.environ.get("RANK", "0") == "0"


def relaunch(stage: str, params: StageParams, num_processes: int, threads_per_rank: int) -> None:
    """Run `sftflow <stage>` as `num_processes` torchrun ranks with these params; returns when all have finished.

    Args:
        stage: the stage to run.
        params: the stage's params (the whole resolved params are written to a file the ranks load).
        num_processes: ranks on this machine.
        threads_per_rank: torch intra-op threads per rank.

    Raises:
        StageError: a rank failed (its log went to this process's stderr).
    """
    with tempfile.TemporaryDirectory(prefix="sftflow-launch-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params.save(params_file)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={num_processes}",
            "-m",
            "tasks.cli",
            stage,
            "--params",
            str(params_file),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), **{LAUNCHED_ENV: "1"})
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        log.info("launching %d ranks: %s", num_processes, " ".join(cmd))
        result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise StageError(
            f"`{stage}` failed in one of its {num_processes} ranks (exit code {result.returncode}); "
            "its error is printed above"
        )


def release_deepspeed_config() -> None:
    """Forget the DeepSpeed config transformers holds, so `from_pretrained` no longer partitions models for
    ZeRO-3 (rank 0 alone loads plain, whole models after training: the merge, the measurements, a gate)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover - transformers without the DeepSpeed integration
        return
    unset_hf_deepspeed_config()
