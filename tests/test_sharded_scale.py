"""Scale-out without a cluster: two simulated nodes (torchrun, c10d rendezvous on localhost), the SLURM variables of
scripts/slurm/train.sbatch, and compile=true on CPU (inductor)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_lab.checkpoint_file import read_checkpoint
from diffusion_lab.module import apply_scale_switches, build_module
from tests.test_sharded import BATCH, STEPS, assert_same_training, reference
from tests.test_train import TINY_TOY, compose_train

ROOT = Path(__file__).resolve().parents[1]

# What srun gives task 5 of `#SBATCH --nodes=2 --ntasks-per-node=4` (node 1, local task 1).
SLURM_TASK_5_OF_8 = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dlab-train", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_NODELIST": "gpu[01-02]",
}  # fmt: skip


SLURM_CHECK = """
import json, signal, sys
from pathlib import Path
from lightning.fabric.plugins.environments import SLURMEnvironment
from diffusion_lab.strategies import FSDP2Strategy
from diffusion_lab.train import build_trainer
from tests.test_train import TINY_TOY, compose_train

trainer, out = sys.argv[1], Path(sys.argv[2])
scale = ["trainer.accelerator=cpu", "trainer.devices=4", "trainer.num_nodes=2"]
cfg = compose_train([*TINY_TOY, f"trainer={trainer}", *scale])
built = build_trainer(cfg, out, [])
env = built.strategy.cluster_environment
last = [cb for cb in built.checkpoint_callbacks if getattr(cb, "stop_signals", None)]
print(json.dumps({
    "slurm": isinstance(env, SLURMEnvironment), "requeue": env.auto_requeue, "address": env.main_address,
    "ranks": [built.world_size, built.global_rank, built.local_rank, built.node_rank],
    "fsdp2": isinstance(built.strategy, FSDP2Strategy),
    "sigusr1": bool(last) and signal.SIGUSR1 in last[0].stop_signals,
}))
"""


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_slurm_variables_give_world_size_ranks_and_the_requeue_signal(tmp_path, trainer):
    """The command of train.sbatch (devices = tasks per node, num_nodes = nodes) under srun's variables: Lightning's
    SLURM environment yields world size 8, global rank 5, local rank 1, node rank 1 and node 1's address; the run's
    last-checkpoint callback handles SIGUSR1 (the sbatch's --signal) by checkpointing and requeueing. In a fresh
    interpreter: building the trainer makes a process "rank 5" and writes MASTER_ADDR, which must not leak into the
    tests that run after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "LOCAL_RANK"))}
    env |= {**SLURM_TASK_5_OF_8, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SLURM_CHECK, trainer, str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "slurm": True, "requeue": True, "address": "gpu01", "ranks": [8, 5, 1, 1], "fsdp2": trainer == "fsdp",
        "sigusr1": True,
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two torchrun agents, each importing torch + Lightning (~1–2 min on 2 shared cores)
def test_two_simulated_nodes_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    """torchrun --nnodes=2 --nproc-per-node=1 on localhost (c10d rendezvous): FSDP2 over 2 "nodes" equals 1 process
    with twice the batch (float64, weights, EMA, AdamW moments; tolerances of tests/test_sharded.py)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=dlab-test", str(ROOT / "tests" / "sharded_train.py"),
        str(tmp_path), "fsdp_2nodes", str(STEPS), "32", "float64", str(BATCH),
    ]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    nodes.append(
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    outputs = [p.communicate(timeout=500)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_training(read_checkpoint(tmp_path / "fsdp_2nodes.ckpt"), reference(tmp_path))


@pytest.mark.slow  # inductor compiles forward and backward (~1 min on 2 shared cores)
def test_compile_true_trains_on_cpu_with_inductor_and_matches_eager() -> None:
    """compile=true on CPU: the compiled network's first loss equals eager's (float32, 1e-5: inductor fuses and
    reorders float32 arithmetic), and two training steps keep the loss finite."""
    cfg = compose_train([*TINY_TOY, "compile=true"])
    torch.manual_seed(0)
    eager = build_module(cfg, (2,))
    compiled = build_module(cfg, (2,))
    compiled.load_state_dict(eager.state_dict())
    apply_scale_switches(compiled, compile=True)
    x0 = torch.randn(64, 2)
    losses = []
    for module in (eager, compiled):
        torch.manual_seed(1)
        losses.append(module.loss_fn(module.denoiser, x0).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    data = torch.utils.data.TensorDataset(torch.randn(128, 2), torch.zeros(128, dtype=torch.long))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(compiled, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=64))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
