"""Training throughput: `sftflow train`'s loop vs a bare HF `Trainer`, same model, data, batch and steps.

Five arms, each in its own process (each has its own peak RSS; nothing warms up for the next):

- `bare`: `transformers.Trainer` with default `TrainingArguments`, as a tutorial writes it: fp32,
  random order, `DataCollatorForSeq2Seq` padding to the longest row of the batch, no DeepSpeed, no
  checkpoints.
- `sftflow`: `tasks.train.run` with the shipped params (`train.precision: auto`, which is bf16
  autocast on a CPU with bf16 units; one rank, so no DeepSpeed: `tasks.core.launch.deepspeed_plan`;
  per-step logging, a checkpoint at the end) but `train.group_by_length=false`, so it reads rows in
  the same kind of random order as `bare`.
- `sftflow-grouped`: `tasks.train.run` as shipped (`group_by_length` is on by default), held to >= 1.5x.
- `sftflow-fp32`: as shipped but `train.precision=fp32`: what bf16 buys, and the val loss it is held
  to (bf16's within 1% of it).
- `sftflow-deepspeed`: as `sftflow-fp32` but through DeepSpeed ZeRO-2 on its one rank (the plan forced):
  what DeepSpeed's bookkeeping costs where it has nothing to split.

All arms train the same scratch base (the shipped `model:` shape, untrained weights: throughput does
not depend on them) on the same features (`tasks.train.encode_rows` of the demo train split), batch
`train.batch_size`, `STEPS` optimizer steps, `THREADS` torch threads each.

The machine is shared, so the arms run at the same time but take turns: one optimizer step each,
round robin (a baton passed through files), the others asleep meanwhile. A burst of load from other
processes then hits every arm alike instead of whichever happened to run during it. One step's time
runs from the start of its step to the start of the next (so it includes collating the next batch and
the per-step logging), the wait for the baton excluded. tokens/s counts real (non-pad) tokens only:
the Trainer's own `non_padding` counter (the attention mask's sum), switched on in both arms. Steps
1..`WARMUP_STEPS` (DeepSpeed's set-up, allocator growth, with grouping the longest batch, which
`LengthGroupedSampler` puts first on purpose, and under bf16 oneDNN's first run of each batch width,
which builds its kernels: a run of hundreds of steps meets each of its few dozen widths many times,
`tasks.core.training.batch_width_multiple`) and the last (it ends with the checkpoint) are left out.

MFU: the training FLOPs the task needs per second (Kaplan et al. 2020: forward 2N + backward 4N per
token), over this machine's matmul peak measured in the same run with the same threads (2048 x 2048
fp32 and bf16 `torch.mm`, best of several). N = all parameters, the tied embedding counted once, as the
vocabulary projection (`head`, vocabulary x hidden); the projection is needed only at positions whose
next token is a label (`supervised_share` of the real tokens: the prompt carries no loss), the rest at
every real token: 6 x (N - head + head x supervised_share) x real tokens/s, the same formula for every
arm. The bare Trainer projects every position anyway, so its extra work does not count; sftflow's
collator projects only the supervised ones (`tasks.core.training.with_supervised_positions`).
Attention-score FLOPs, about 12 x layers x hidden x mean length per token, are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2  # same for every arm and for the matmul peak; the machine has 2 cores
STEPS = 40  # 31 steady steps per arm; with 24 (15 steady) the headline ratio ranged 1.45x-1.65x over three runs
WARMUP_STEPS = 8
VAL_ROWS = 16  # only the stage's final val loss reads the val split, outside the timed loop
ARMS = ("bare", "sftflow", "sftflow-grouped", "sftflow-fp32", "sftflow-deepspeed")
ARM_TIMEOUT_S = 360


# --------------------------------------------------------------------------------- machine peak


def matmul_peak(dtype_name: str, n: int, seconds: float = 3.0) -> dict[str, Any]:
    """Best FLOP/s of an n x n `torch.mm` in `dtype_name` over repeated runs for about `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # first call: allocation and kernel selection
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        reps += 1
    return {"dtype": dtype_name, "n": n, "reps": reps, "best_s": best, "flops_per_s": 2 * n**3 / best}


# ---------------------------------------------------------------------------------- preparation


def _arm_params(workdir: Path, arm: str) -> Any:
    """The project's params.yaml, outputs under `workdir/arm`, STEPS steps and THREADS threads."""
    from tasks.core.config import load_params

    overrides = [
        f"paths.artifacts={workdir / arm / 'artifacts'}",
        f"paths.metrics={workdir / arm / 'metrics'}",
        f"paths.plots={workdir / arm / 'plots'}",
        f"train.max_steps={STEPS}",
        f"train.torch_threads={THREADS}",
    ]
    if arm == "sftflow":
        overrides.append("train.group_by_length=false")
    elif arm != "bare":
        overrides.append("train.group_by_length=true")
    if arm in ("sftflow-fp32", "sftflow-deepspeed"):
        overrides.append("train.precision=fp32")
    return load_params(ROOT / "params.yaml", overrides)


def prepare(workdir: Path) -> dict[str, Any]:
    """Write the splits and an untrained scratch base (the shipped model shape); link them for every arm."""
    from tasks.core.io import read_jsonl, set_seed, write_jsonl
    from tasks.core.modeling import (
        build_scratch_model,
        count_parameters,
        save_model,
        train_tokenizer,
    )

    params = _arm_params(workdir, "shared")
    split_dir = params.layout.stage_dir("split")
    shipped = ROOT / "artifacts" / "split"
    if (shipped / "train.jsonl").exists() and (shipped / "val.jsonl").exists():
        source = f"{shipped}/train.jsonl"
        train_rows, val_rows = read_jsonl(shipped / "train.jsonl"), read_jsonl(shipped / "val.jsonl")
    else:  # no `sftflow split` run in this checkout: make the splits with the stages themselves
        import tasks.split
        import tasks.validate

        tasks.validate.run(params)
        tasks.split.run(params)
        source = f"validate + split of {params.data.path}"
        train_rows, val_rows = read_jsonl(split_dir / "train.jsonl"), read_jsonl(split_dir / "val.jsonl")
    write_jsonl(split_dir / "train.jsonl", train_rows)
    write_jsonl(split_dir / "val.jsonl", val_rows[:VAL_ROWS])

    set_seed(0)
    tokenizer = train_tokenizer(
        [r["text"] for r in train_rows] + [r["summary"] for r in train_rows],
        kind=params.model.tokenizer,
        vocab_size=params.model.vocab_size,
    )
    model = build_scratch_model(params.model, tokenizer)
    save_model(model, tokenizer, params.layout.stage_dir("pretrain") / "model")
    for arm in ARMS:  # each arm writes its own artifacts/train/, reads the same base and splits
        arm_dir = _arm_params(workdir, arm).paths.artifacts
        arm_dir.mkdir(parents=True)
        for stage in ("split", "pretrain"):
            (arm_dir / stage).symlink_to(params.layout.stage_dir(stage).resolve(), target_is_directory=True)
    _, total = count_parameters(model)
    return {
        "train_rows": len(train_rows),
        "head_parameters": model.get_output_embeddings().weight.numel(),
        "data": source,
        "parameters": total,
        "model": params.model.model_dump(),
        "batch_size": params.train.batch_size,
    }


# ------------------------------------------------------------------------------------------ arms


class Baton:
    """Round-robin turns between the arm processes through files in `folder`: one holder at a time."""

    def __init__(self, folder: Path, index: int, count: int) -> None:
        self.folder, self.index, self.count = folder, index, count

    def _turn(self) -> int | None:
        try:
            return int((self.folder / "turn").read_text())
        except (OSError, ValueError):  # not written yet, or mid-replace
            return None

    def acquire(self) -> None:
        """Wait until every arm is ready and it is this arm's turn."""
        (self.folder / f"ready-{self.index}").touch()
        deadline = time.monotonic() + ARM_TIMEOUT_S
        while not (
            self._turn() == self.index and all((self.folder / f"ready-{i}").exists() for i in range(self.count))
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"arm {self.index} waited {ARM_TIMEOUT_S} s for its turn; did another arm die?")
            time.sleep(0.002)

    def release(self, done: bool = False) -> None:
        """Pass the turn to the next arm that has not finished."""
        if done:
            (self.folder / f"done-{self.index}").touch()
        for k in range(1, self.count + 1):
            nxt = (self.index + k) % self.count
            if not (self.folder / f"done-{nxt}").exists():
                break
        tmp = self.folder / f"turn.{self.index}.tmp"
        tmp.write_text(str(nxt))
        os.replace(tmp, self.folder / "turn")


class Meter:
    """Times each optimizer step while holding the baton; counts real and padded tokens."""

    def __init__(self, baton: Baton) -> None:
        self.baton = baton
        self.collated_real = 0
        self.collated_padded = 0
        self.collated_supervised = 0  # positions whose next token is a label (the loss's tokens)
        self.steps: list[dict[str, float]] = []  # one per finished step: seconds, CPU seconds, real tokens
        self.peak_rss_mb = 0.0

    def wrap(self, collate: Any) -> Any:
        """The collator, counting what it pads (for the pad share only; tokens/s uses the Trainer's counter)."""

        def counted(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            self.collated_real += int(batch["attention_mask"].sum())
            self.collated_padded += int(batch["attention_mask"].numel())
            self.collated_supervised += int((batch["labels"][:, 1:] != -100).sum())
            return batch

        return counted

    def callback(self) -> Any:
        """A TrainerCallback that takes the baton for each step and records the step's time and tokens."""
        from transformers import TrainerCallback

        from tasks.core.training import peak_rss_mb

        meter = self
        open_step: dict[str, float] = {}

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if open_step:  # the previous step ends where this one begins
                    meter.steps.append(
                        {
                            "seconds": time.perf_counter() - open_step["wall"],
                            "cpu_seconds": time.process_time() - open_step["cpu"],
                            "tokens": open_step["tokens"],
                        }
                    )
                    meter.baton.release()
                meter.baton.acquire()
                open_step.update(wall=time.perf_counter(), cpu=time.process_time(), seen=state.num_input_tokens_seen)

            def on_step_end(self, args, state, control, **kwargs):
                open_step["tokens"] = state.num_input_tokens_seen - open_step["seen"]

            def on_train_end(self, args, state, control, **kwargs):
                meter.peak_rss_mb = peak_rss_mb()  # before the stage's merge and val-loss passes
                meter.baton.release(done=True)

        return StepTimer()

    def instrument(self, trainer: Any) -> None:
        """Hook a constructed Trainer: count at its collator, time its steps."""
        trainer.data_collator = self.wrap(trainer.data_collator)
        trainer.add_callback(self.callback())

    def summary(self) -> dict[str, Any]:
        """Real tokens/s over the steady steps (per wall second and per CPU second of this process)."""
        steady = self.steps[WARMUP_STEPS:]
        seconds = sum(s["seconds"] for s in steady)
        cpu = sum(s["cpu_seconds"] for s in steady)
        tokens = sum(s["tokens"] for s in steady)
        return {
            "steady_steps": len(steady),
            "steady_seconds": seconds,
            "steady_cpu_seconds": cpu,
            "steady_real_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu,
            "steps_per_s": len(steady) / seconds,  # x the batch (the same in every arm): samples/s
            # Robust to a burst of other load that hits one step: the median step's rate.
            "median_step_tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in steady),
            "step_seconds": [round(s["seconds"], 3) for s in self.steps],
            "step_tokens": [s["tokens"] for s in self.steps],
            "pad_share": 1 - self.collated_real / self.collated_padded,
            "supervised_share": self.collated_supervised / self.collated_real,
            "peak_rss_mb": self.peak_rss_mb,
        }


def run_sftflow(workdir: Path, arm: str, baton: Baton) -> dict[str, Any]:
    """`tasks.train.run` on the prepared base and splits, with a Meter hooked into its Trainer."""
    import tasks.train as stage

    meter = Meter(baton)
    make_trainer = stage._make_trainer

    def instrumented(*args: Any, **kwargs: Any) -> Any:
        trainer, session = make_trainer(*args, **kwargs)
        meter.instrument(trainer)
        return trainer, session

    stage._make_trainer = instrumented
    if arm == "sftflow-deepspeed":
        stage.deepspeed_plan = lambda config, world_size: (True, "forced by bench/train.py")
    params = _arm_params(workdir, arm)
    metrics = stage.run(params)
    return {
        **meter.summary(),
        "group_by_length": params.train.group_by_length,
        "deepspeed_used": metrics["deepspeed_used"],
        "deepspeed_reason": metrics["deepspeed_reason"],
        "precision": metrics["precision"],
        "val_loss": metrics["val_loss"],
        "threads": metrics["threads_per_process"],
    }


def run_bare(workdir: Path, baton: Baton) -> dict[str, Any]:
    """A plain HF Trainer on the same base, features, batch and steps."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tasks.core.io import read_jsonl, set_seed
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.train import encode_rows

    params = _arm_params(workdir, "bare")
    cfg = params.train
    torch.set_num_threads(THREADS)
    model, tokenizer = load_model_and_tokenizer(params.layout.stage_dir("pretrain") / "model")
    features, _ = encode_rows(params, tokenizer, read_jsonl(params.layout.stage_dir("split") / "train.jsonl"))
    set_seed(cfg.seed)
    args = TrainingArguments(
        output_dir=str(workdir / "bare" / "out"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=STEPS,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # the same counter the stage uses
        report_to=[],
    )
    meter = Meter(baton)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
    )
    meter.instrument(trainer)
    trainer.train()
    return {**meter.summary(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ main


def run_arms(workdir: Path) -> dict[str, dict[str, Any]]:
    """Start every arm at once (they take turns step by step); return each arm's figures."""
    baton_dir = workdir / "baton"
    baton_dir.mkdir()
    (baton_dir / "turn").write_text("0")
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    procs = {}
    for arm in ARMS:
        cmd = [sys.executable, "-m", "bench.train", "--arm", arm, "--workdir", str(workdir), "--out", str(workdir / f"{arm}.json")]
        log = (workdir / f"{arm}.log").open("w")
        procs[arm] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ARM_TIMEOUT_S
    failed = []
    for arm, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc != 0:
            failed.append(arm)
    if failed:
        for arm in procs.values():
            if arm.poll() is None:
                arm.kill()
        logs = "\n".join(f"--- {a}:\n{(workdir / f'{a}.log').read_text()[-2500:]}" for a in failed)
        raise RuntimeError(f"train bench arm(s) {failed} failed:\n{logs}")
    return {arm: json.loads((workdir / f"{arm}.json").read_text(encoding="utf-8")) for arm in ARMS}


def main() -> dict[str, Any]:
    """Measure the matmul peaks, run the three arms interleaved; return rows for the runner's table."""
    import torch

    with tempfile.TemporaryDirectory(prefix="sftflow-bench-train-") as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir)
        torch.set_num_threads(THREADS)
        peaks = {"fp32": matmul_peak("float32", 2048), "bf16": matmul_peak("bfloat16", 2048)}
        arms = run_arms(workdir)

    bare, plain, grouped = arms["bare"], arms["sftflow"], arms["sftflow-grouped"]
    fp32, deepspeed = arms["sftflow-fp32"], arms["sftflow-deepspeed"]
    n = setup["parameters"]
    fp32_peak, bf16_peak = peaks["fp32"]["flops_per_s"], peaks["bf16"]["flops_per_s"]

    head = setup["head_parameters"]

    def flops_per_token(arm: dict[str, Any]) -> float:
        # The vocabulary projection is needed only where the next token is a label; the rest at every real token.
        return 6 * (n - head + head * arm["supervised_share"])

    def mfu(arm: dict[str, Any], peak: float = fp32_peak) -> float:
        return flops_per_token(arm) * arm["tokens_per_s"] / peak

    def describe(arm: dict[str, Any], base: dict[str, Any] = bare) -> str:
        cpu = arm["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        median = arm["median_step_tokens_per_s"] / base["median_step_tokens_per_s"]
        return (
            f"{arm['tokens_per_s']:.0f} tok/s, pad {arm['pad_share']:.0%} "
            f"(median step {median:.2f}x, per CPU-second {cpu:.2f}x)"
        )

    def how(arm: dict[str, Any]) -> str:
        return f"{arm['precision']}, {'DeepSpeed ZeRO-2' if arm['deepspeed_used'] else 'no DeepSpeed'}"

    val_delta = grouped["val_loss"] / fp32["val_loss"] - 1
    rows = [
        {
            "name": "train: sftflow as shipped / bare Trainer",
            "ratio": round(grouped["tokens_per_s"] / bare["tokens_per_s"], 2),
            "target": ">= 1.5x",
            "note": (
                f"{how(grouped)}, group_by_length: {describe(grouped)}; samples/s "
                f"{grouped['steps_per_s'] * setup['batch_size']:.1f} vs {bare['steps_per_s'] * setup['batch_size']:.1f} "
                f"({grouped['steps_per_s'] / bare['steps_per_s']:.2f}x: grouped batches hold other rows than random ones, "
                f"so real tokens/s is the ratio); bare Trainer (default TrainingArguments: fp32, "
                f"random order) {bare['tokens_per_s']:.0f} tok/s, pad {bare['pad_share']:.0%}; real tokens, "
                f"{STEPS - WARMUP_STEPS - 1} steady steps of hidden {setup['model']['hidden_size']} x "
                f"{setup['model']['num_layers']} layers, batch {setup['batch_size']}, {THREADS} threads, interleaved"
            ),
        },
        {
            "name": "train: sftflow loop, random order / bare",
            "ratio": round(plain["tokens_per_s"] / bare["tokens_per_s"], 2),
            "target": "info",
            "note": f"{how(plain)}, random order like bare: {describe(plain)}",
        },
        {
            "name": "train: bf16 autocast / fp32 (both grouped)",
            "ratio": round(grouped["tokens_per_s"] / fp32["tokens_per_s"], 2),
            "target": "val loss within 1%",
            "met": abs(val_delta) <= 0.01,
            "note": (
                f"{describe(grouped, fp32)}; val loss after {STEPS} steps {grouped['val_loss']:.4f} vs fp32 "
                f"{fp32['val_loss']:.4f} ({val_delta:+.2%})"
            ),
        },
        {
            "name": "train: DeepSpeed ZeRO-2, one rank / none",
            "ratio": round(deepspeed["tokens_per_s"] / fp32["tokens_per_s"], 2),
            "target": "info (<= 3% cost)",
            "note": (
                f"fp32, grouped, DeepSpeed forced on one rank: {describe(deepspeed, fp32)}; so one rank trains without "
                "it (tasks.core.launch.deepspeed_plan)"
            ),
        },
        {
            "name": "train: peak RSS, sftflow / bare",
            "ratio": round(grouped["peak_rss_mb"] / bare["peak_rss_mb"], 2),
            "target": "<= 1.0x",
            "note": (
                f"{grouped['peak_rss_mb']:.0f} MiB (fp32 {fp32['peak_rss_mb']:.0f}, with DeepSpeed "
                f"{deepspeed['peak_rss_mb']:.0f}) vs bare {bare['peak_rss_mb']:.0f} MiB, whole process at the end of train()"
            ),
        },
        {
            "name": "train: MFU as shipped",
            "ratio": f"{mfu(grouped):.1%}",
            "target": "info",
            "note": (
                f"6 x (N - head + head x supervised share) x tok/s, N={n / 1e6:.2f}M, vocabulary projection "
                f"head={head / 1e6:.2f}M, {grouped['supervised_share']:.0%} of tokens supervised: "
                f"{flops_per_token(grouped) * grouped['tokens_per_s'] / 1e9:.1f} GFLOP/s vs matmul peak "
                f"fp32 {fp32_peak / 1e9:.0f} / bf16 {bf16_peak / 1e9:.0f} GFLOP/s ({THREADS} threads): "
                f"{mfu(grouped):.1%} of fp32's, {mfu(grouped, bf16_peak):.1%} of bf16's; bare {mfu(bare):.1%} of fp32's"
            ),
        },
    ]
    result = {
        "name": "train",
        "rows": rows,
        "threads": THREADS,
        "steps": STEPS,
        "warmup_steps": WARMUP_STEPS,
        "setup": setup,
        "matmul_peak": peaks,
        "arms": arms,
        "mfu_fp32": {arm: mfu(a) for arm, a in arms.items()},
        "mfu_bf16": {arm: mfu(a, bf16_peak) for arm, a in arms.items()},
        "flops_formula": (
            "6 * (parameters - vocabulary projection + vocabulary projection * supervised share) * real tokens/s: "
            "the FLOPs the task needs (the projection only where the next token is a label; attention scores left out)"
        ),
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


def _arm_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one arm of the train benchmark (started by bench.train.main)")
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    baton = Baton(args.workdir / "baton", ARMS.index(args.arm), len(ARMS))
    result = run_bare(args.workdir, baton) if args.arm == "bare" else run_sftflow(args.workdir, args.arm, baton)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _arm_main()
    else:
        main()
