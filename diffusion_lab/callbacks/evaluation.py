"""Sample-quality evaluation of the EMA denoiser during and at the end of training.

Every number is logged under a key that carries its protocol: metric name, sample count and NFE
(``val/fd_digits@1k_nfe50``); the reference set is the training split of the datamodule.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.callbacks.sample_grid import periodic_step_due
from diffusion_lab.metrics import protocol_key
from diffusion_lab.module import DiffusionModule
from diffusion_lab.samplers import Sampler

MAX_REFERENCE = 10_000


def generate_in_batches(
    module: DiffusionModule,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    sampler: Sampler | None = None,
    use_ema: bool = True,
    progress: bool = False,
) -> tuple[Tensor, int, float]:
    """``num_samples`` samples (index-seeded), the NFE per sample and the sampling rate (samples/s)."""
    chunks, nfe = [], 0
    start = time.perf_counter()
    for lo in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=not progress):
        idx = range(lo, min(lo + batch_size, num_samples))
        out = module.generate(idx, seed=seed, sampler=sampler, use_ema=use_ema, progress=progress)
        chunks.append(out.x0.cpu())
        nfe = out.nfe
    elapsed = time.perf_counter() - start
    return torch.cat(chunks), nfe, num_samples / max(elapsed, 1e-9)


class SampleEvaluation(L.Callback):
    """Compute ``metric(samples, reference)`` on ``num_samples`` EMA samples at the end of training
    (and every ``every_n_steps`` steps when > 0). Results are kept in :attr:`results`.
    """

    def __init__(self, metric: Any, num_samples: int, batch_size: int, every_n_steps: int = 0) -> None:
        self.metric = metric
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.results: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if periodic_step_due(trainer, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, score, log; returns the protocol-keyed results (rank 0 only)."""
        if self.metric is None or self.num_samples <= 0 or not trainer.is_global_zero:
            return {}
        assert isinstance(pl_module, DiffusionModule)
        samples, nfe, rate = generate_in_batches(pl_module, self.num_samples, self.batch_size)
        reference = trainer.datamodule.train_tensor()[:MAX_REFERENCE]  # type: ignore[attr-defined]
        raw = self.metric.compute(samples, reference)
        results = {protocol_key("val", k, self.num_samples, nfe): float(v) for k, v in raw.items()}
        results[f"val/samples_per_s_nfe{nfe}"] = rate
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        self.results = results
        return results
