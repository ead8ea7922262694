"""Data-parallel training of one candidate under torchrun (`train.distributed: {nproc: N}`).

The calling process writes what the training needs (the student as it starts, the transfer set and its stored
signal, the validation split, the settings) next to the candidate's checkpoint, runs
`torchrun --standalone --nproc-per-node N -m distill_core.ddp JOB`, and reads back what rank 0 wrote: the trained
student and how training went. Each process runs `train.train_student` in a gloo group on the CPU, or in an
NCCL group with one GPU each (`train.device`: cuda, or auto where torch sees GPUs); rank 0 writes the
checkpoints, in the one-process format, so a killed run resumes at the same world size or another one, and the
calling process logs to MLflow as for any candidate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill_core.errors import DistillError
from distill_core.modules import TextModule, picklable, resolve_device
from distill_core.recipe import StudentConfig, TrainConfig
from distill_core.tasks import Task, task_named

JOB, RESULT = "ddp-job.pt", "ddp-result.pt"


class DistributedTrainingError(DistillError):
    """The torchrun processes failed (the message has the end of their output)."""


def check_shares(n: int, cfg: TrainConfig) -> None:
    """Refuse a layout in which some process would get no micro-batch of an update (every process must take part
    in every gradient average): each update's rows are shared out, the epoch's last update's too."""
    assert cfg.distributed is not None
    nproc, accumulation = cfg.distributed.nproc, getattr(cfg, "grad_accumulation", 1)
    rows = cfg.batch_size * accumulation
    for size in {min(rows, n), n % rows or rows}:
        if size // nproc < accumulation:
            raise DistillError(
                f"train.distributed.nproc {nproc} with batches of {size} rows (batch_size {cfg.batch_size} × "
                f"grad_accumulation {accumulation}, {n} transfer rows): a process would get fewer than "
                f"{accumulation} rows of an update; use fewer processes or larger batches"
            )


def train_distributed(
    student: TextModule,
    student_cfg: StudentConfig,
    cfg: TrainConfig,
    transfer: Any,
    validation: tuple[Sequence[Any], np.ndarray],
    checkpoint_dir: str | Path,
    fingerprint: str,
    log: Callable[[str], None],
    task: Task,
    signal_cfg: Any,
) -> Any:
    """Train under torchrun and return the TrainResult rank 0 made (its student is the trained one)."""
    assert cfg.distributed is not None
    check_shares(len(transfer.texts), cfg)
    nproc = cfg.distributed.nproc
    if resolve_device(cfg.device, "distributed training").type == "cuda" and nproc > torch.cuda.device_count():
        raise DistillError(
            f"train.distributed.nproc {nproc} on the GPU: each process takes one, and this machine has "
            f"{torch.cuda.device_count()}; use at most that many processes, or train.device: cpu"
        )
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    job, result_path = folder / JOB, folder / RESULT
    result_path.unlink(missing_ok=True)
    job_state = {
        "student": picklable(student),
        "student_cfg": student_cfg,
        "cfg": cfg,
        "transfer": transfer,
        "validation": validation,
        "fingerprint": fingerprint,
        "task": task.name,
        "signal_cfg": signal_cfg,
        "result": str(result_path),
    }
    torch.save(job_state, job)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    log(f"training {student_cfg.name} in {nproc} processes (torchrun)")
    done = subprocess.run(
        [*command, "-m", "distill_core.ddp", str(job)], capture_output=True, text=True, env=_environment(nproc)
    )
    for line in done.stdout.splitlines():
        log(line)
    job.unlink(missing_ok=True)
    if done.returncode != 0 or not result_path.exists():
        tail = (done.stdout + done.stderr)[-3000:]
        raise DistributedTrainingError(
            f"distributed training of {student_cfg.name} ({nproc} processes) failed with exit code "
            f"{done.returncode}; its checkpoint in {folder} resumes a rerun:\n{tail}"
        )
    result = torch.load(result_path, weights_only=False)
    result_path.unlink()
    return result


def _environment(nproc: int) -> dict[str, str]:
    """The processes share this machine's cores: torch's intra-op threads split between them."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def main(job_path: str) -> None:
    """One torchrun process: join the group, train, and (rank 0) write the result."""
    from distill_core.train import train_student

    job = torch.load(job_path, weights_only=False)
    gpu = resolve_device(job["cfg"].device, "distributed training").type == "cuda"
    if gpu:  # one GPU per process, NCCL between them; else gloo on the CPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        rank = dist.get_rank()
        result = train_student(
            job["student"],
            job["student_cfg"],
            job["cfg"],
            job["transfer"],
            job["validation"],
            Path(job_path).parent,
            fingerprint=job["fingerprint"],
            log=print if rank == 0 else (lambda _: None),
            task=task_named(job["task"]),
            signal_cfg=job["signal_cfg"],
        )
        if rank == 0:
            picklable(result.student)
            tmp = Path(job["result"]).with_suffix(".partial")
            torch.save(result, tmp)
            os.replace(tmp, job["result"])
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
