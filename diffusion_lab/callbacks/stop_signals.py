"""Stop signals during training: which signals stop a run, the exit it stops with, DDP agreement, SLURM requeue.

:class:`~diffusion_lab.callbacks.checkpoint.LastCheckpoint` installs the handlers and writes ``last.ckpt`` of the
step a signal arrived in; this module holds what that decision needs beyond the callback itself.
"""

from __future__ import annotations

import logging
import os
import signal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

# The logger of diffusion_lab.callbacks.checkpoint, where this code lived before the split: log filters name it.
log = logging.getLogger("diffusion_lab.callbacks.checkpoint")

# SIGUSR1 is what scripts/slurm/train.sbatch asks SLURM to send 90 s before the time limit (--signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingInterrupted(SIGTERMException):
    """Training stopped on a signal after writing ``last.ckpt`` of the step it arrived in.

    A ``SystemExit`` whose status is ``128 + signal number`` (the shell's convention: 143 for SIGTERM, 130 for
    SIGINT, 138 for SIGUSR1), so a scheduler or script sees an interrupted run, not a finished one."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


def agreed_signal(trainer: L.Trainer, received: int | None) -> int:
    """The stop signal any rank received (0: none). Under DDP one all-reduce (max), so all ranks agree."""
    local = int(received or 0)
    if trainer.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    flag = torch.tensor([local], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def requeue_slurm_job(trainer: L.Trainer, signum: int) -> bool:
    """``scontrol requeue <job>`` when the run is a SLURM job with Lightning's auto-requeue on and ``signum`` is
    its requeue signal (SIGUSR1 by default), as Lightning's own handler does; returns whether it requeued."""
    import subprocess

    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == env.requeue_signal):
        return False
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        status = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except OSError as err:  # no scontrol on this node: the checkpoint is written, the job just is not requeued
        log.warning("requeueing SLURM job %s failed: %s", job, err)
        return False
    if status != 0:
        log.warning("requeueing SLURM job %s failed (scontrol exit status %d)", job, status)
    return status == 0
