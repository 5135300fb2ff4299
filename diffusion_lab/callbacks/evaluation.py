"""Sample-quality evaluation of the EMA denoiser during and at the end of training.

Every number is logged under a key that carries its protocol: metric name, sample count and NFE
(``val/fd_digits@1k_nfe50``), plus ``_cfg<w>`` when sampled with classifier-free guidance scale w
(``val/fd_digits@1k_nfe50_cfg3``: 50 denoiser calls per sample, each one batched call of 2 network
evaluations); the reference set is the training split of the datamodule. A class-conditional model is
sampled with labels cycling over the classes, so the sample set is class-balanced like the reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from tqdm.auto import tqdm

from diffusion_lab.callbacks.sample_grid import periodic_step_due
from diffusion_lab.metrics import protocol_key
from diffusion_lab.module import DiffusionModule, Generation
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
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
) -> tuple[Generation, float]:
    """``num_samples`` index-seeded samples (with labels, NFE and guidance) and the sampling rate (samples/s).

    ``class_labels`` and ``guidance_scale`` are passed to :meth:`DiffusionModule.generate`.
    """
    chunks, labels, nfe = [], [], 0
    start = time.perf_counter()
    for lo in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=not progress):
        idx = range(lo, min(lo + batch_size, num_samples))
        out = module.generate(
            idx, seed, sampler, use_ema, progress, class_labels=class_labels, guidance_scale=guidance_scale
        )
        chunks.append(out.x0.cpu())
        if out.y is not None:
            labels.append(out.y.cpu())
        nfe = out.nfe
    elapsed = time.perf_counter() - start
    y = torch.cat(labels) if labels else None
    return Generation(torch.cat(chunks), nfe, y=y, guidance_scale=guidance_scale), num_samples / max(elapsed, 1e-9)


def guidance_suffix(guidance_scale: float | None) -> str:
    """Metric-key suffix of a sampling protocol: ``""`` unguided, ``"_cfg3"`` / ``"_cfg1.5"`` under guidance."""
    return "" if guidance_scale is None else f"_cfg{guidance_scale:g}"


def sampling_protocol(out: Generation, num_classes: int | None) -> dict[str, Any]:
    """The sampling half of a quality number's protocol: NFE, network evaluations, guidance and labels."""
    return {
        "nfe": out.nfe,
        "network_evals_per_sample": out.network_evals,
        "guided": out.guided,
        "guidance_scale": out.guidance_scale,
        "labels": None if num_classes is None else f"cycled over 0..{num_classes - 1}",
    }


class SampleEvaluation(L.Callback):
    """Compute ``metric(samples, reference)`` on ``num_samples`` EMA samples at the end of training
    (and every ``every_n_steps`` steps when > 0), with classifier-free guidance ``guidance_scale`` if set.
    Results are kept in :attr:`results`, the sampling protocol (NFE, guidance, labels) in :attr:`protocol`.
    """

    def __init__(
        self,
        metric: Any,
        num_samples: int,
        batch_size: int,
        every_n_steps: int = 0,
        guidance_scale: float | None = None,
    ) -> None:
        self.metric = metric
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.guidance_scale = guidance_scale
        self.results: dict[str, float] = {}
        self.protocol: dict[str, Any] = {}

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
        out, rate = generate_in_batches(
            pl_module, self.num_samples, self.batch_size, guidance_scale=self.guidance_scale
        )
        reference = trainer.datamodule.train_tensor()[:MAX_REFERENCE]  # type: ignore[attr-defined]
        raw = self.metric.compute(out.x0, reference)
        suffix = guidance_suffix(self.guidance_scale)
        results = {protocol_key("val", k, self.num_samples, out.nfe) + suffix: float(v) for k, v in raw.items()}
        results[f"val/samples_per_s_nfe{out.nfe}{suffix}"] = rate
        self.protocol = sampling_protocol(out, pl_module.num_classes)
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        self.results = results
        return results
