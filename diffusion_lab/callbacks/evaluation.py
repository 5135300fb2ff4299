"""Sample-quality evaluation of the EMA denoiser during and at the end of training.

Every number is logged under a key that carries its protocol: metric name, sample count and NFE
(``val/fd_digits@1k_nfe50``), plus ``_cfg<w>`` when sampled with classifier-free guidance scale w
(``val/fd_digits@1k_nfe50_cfg3``: 50 denoiser calls per sample, each one batched call of 2 network
evaluations); the reference set is the training split of the datamodule. A class-conditional model is
sampled with labels cycling over the classes, so the sample set is class-balanced like the reference.
Under DDP each rank samples indices ``rank, rank + W, …`` and rank 0 scores the gathered set, which equals
the single-process one (sample ``i`` depends only on ``(seed, i)``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from tqdm.auto import tqdm

from diffusion_lab.callbacks.sample_grid import periodic_step_due
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.metrics import metric_key
from diffusion_lab.module import DiffusionModule, Generation
from diffusion_lab.samplers import Sampler

MAX_REFERENCE = 10_000


def generate_indices(
    module: DiffusionModule,
    indices: Sequence[int],
    batch_size: int,
    seed: int = 0,
    sampler: Sampler | None = None,
    use_ema: bool = True,
    progress: bool = False,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    guidance: Guidance | None = None,
) -> Generation:
    """The index-seeded samples ``indices`` (in that order, on CPU), ``batch_size`` at a time.

    Sample ``i`` depends only on ``(seed, i)`` (:meth:`DiffusionModule.generate`), so any partition of the
    indices over batches or ranks yields the same set.
    """
    chunks, labels, last = [], [], Generation(torch.empty(0), 0, guidance_scale=guidance_scale)
    for lo in tqdm(range(0, len(indices), batch_size), desc="sampling", disable=not progress):
        idx = indices[lo : lo + batch_size]
        last = module.generate(
            idx, seed, sampler, use_ema, progress, class_labels=class_labels, guidance_scale=guidance_scale,
            guidance=guidance,
        )  # fmt: skip
        chunks.append(last.x0.cpu())
        if last.y is not None:
            labels.append(last.y.cpu())
    x0 = torch.cat(chunks) if chunks else torch.empty(0, *module.data_shape)
    y = torch.cat(labels) if labels else None
    return dataclasses.replace(last, x0=x0, y=y)  # the protocol (NFE, guidance) of every batch


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
    guidance: Guidance | None = None,
) -> tuple[Generation, float]:
    """``num_samples`` index-seeded samples (with labels, NFE and guidance) and the sampling rate (samples/s).

    ``class_labels``, ``guidance_scale`` and ``guidance`` are passed to :meth:`DiffusionModule.generate`.
    """
    start = time.perf_counter()
    out = generate_indices(
        module, range(num_samples), batch_size, seed, sampler, use_ema, progress, class_labels, guidance_scale,
        guidance,
    )  # fmt: skip
    return out, samples_per_second(num_samples, start)


def samples_per_second(num_samples: int, start: float) -> float:
    """The sampling rate of ``num_samples`` samples drawn since ``start`` (a ``time.perf_counter()`` reading)."""
    return num_samples / max(time.perf_counter() - start, 1e-9)


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s share of ``0 … num_samples − 1``: ``rank, rank + W, rank + 2W, …`` (disjoint, covering)."""
    return range(rank, num_samples, world_size)


def _gather_strided(module: L.LightningModule, local: torch.Tensor, num_samples: int, world_size: int) -> torch.Tensor:
    """Undo :func:`shard_indices`: every rank's ``(≤ ceil(N/W), ...)`` rows -> the ``(N, ...)`` set in index order.

    Shards are zero-padded to one length (``all_gather`` needs equal shapes); rank ``r``'s row ``k`` is sample
    ``r + kW``, so the ``(W, K, ...)`` gather read in ``(K, W)`` order is ``0, 1, 2, …``; the padding lands past N.
    """
    per_rank = -(-num_samples // world_size)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = module.all_gather(padded.to(module.device))  # (W, K, ...)
    assert isinstance(gathered, torch.Tensor)
    return gathered.transpose(0, 1).reshape(world_size * per_rank, *local.shape[1:])[:num_samples].cpu()


def generate_sharded(
    module: DiffusionModule,
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> tuple[Generation, float]:
    """Each rank samples :func:`shard_indices`; the full ``num_samples`` set is gathered on every rank.

    Returns exactly the samples of a single-process :func:`generate_in_batches` (same order), and samples/s
    over all ranks. Every rank must call this (it runs collective ``all_gather``s).
    """
    if world_size == 1:
        return generate_in_batches(module, num_samples, batch_size, seed, guidance_scale=guidance_scale)
    start = time.perf_counter()
    out = generate_indices(
        module, shard_indices(num_samples, rank, world_size), batch_size, seed, guidance_scale=guidance_scale
    )
    x0 = _gather_strided(module, out.x0, num_samples, world_size)
    y = None
    if module.num_classes is not None:  # decided by the model, not the shard: an empty shard still gathers
        y_local = out.y if out.y is not None else torch.empty(0, dtype=torch.long)
        y = _gather_strided(module, y_local, num_samples, world_size)
    return Generation(x0, out.nfe, y=y, guidance_scale=guidance_scale), samples_per_second(num_samples, start)


def guidance_suffix(guidance_scale: float | None) -> str:
    """Metric-key suffix of a sampling protocol: ``""`` unguided, ``"_cfg3"`` / ``"_cfg1.5"`` under guidance."""
    return "" if guidance_scale is None else f"_cfg{guidance_scale:g}"


def generation_suffix(out: Generation) -> str:
    """Metric-key suffix of how ``out`` was guided: :func:`guidance_suffix` (``"_cfg3"``), ``"_auto3"`` under
    autoguidance, then ``"_in0.3-5"`` when limited to σ/α in (0.3, 5]."""
    if out.guidance_scale is None:
        return ""
    kind = "_auto" if out.guidance == "auto" else "_cfg"
    interval = "" if out.guidance_interval is None else "_in{:g}-{:g}".format(*out.guidance_interval)
    return f"{kind}{out.guidance_scale:g}{interval}"


def sampling_protocol(out: Generation, num_classes: int | None) -> dict[str, Any]:
    """The sampling half of a quality number's protocol: NFE, network evaluations, guidance and labels."""
    return {
        "nfe": out.nfe,
        "network_evals_per_sample": out.network_evals,
        "guided": out.guided,
        "guidance_scale": out.guidance_scale,
        "guidance": out.guidance,  # cfg | auto | None
        "guidance_interval": None if out.guidance_interval is None else list(out.guidance_interval),
        "guided_calls_per_sample": out.nfe if out.guided and out.guided_calls is None else out.guided_calls,
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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fail before training on a metric that cannot run (e.g. ``metrics=fid`` without Inception weights)."""
        check = getattr(self.metric, "check_ready", None)
        if check is not None and self.num_samples > 0 and trainer.is_global_zero:
            check()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if periodic_step_due(trainer, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample (sharded over the DDP ranks), score and log on rank 0; returns the protocol-keyed results there."""
        if self.metric is None or self.num_samples <= 0:
            return {}
        assert isinstance(pl_module, DiffusionModule)
        out, rate = generate_sharded(
            pl_module, self.num_samples, self.batch_size, trainer.global_rank, trainer.world_size,
            guidance_scale=self.guidance_scale,
        )  # fmt: skip
        if not trainer.is_global_zero:
            return {}
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if getattr(self.metric, "reference_name", None) == "reference":  # name the reference cache entry
            self.metric.reference_name = f"{type(datamodule).__name__}-train"
        max_reference = getattr(self.metric, "max_reference", MAX_REFERENCE)
        reference = datamodule.train_tensor()
        reference = reference if max_reference is None else reference[:max_reference]
        raw = self.metric.compute(out.x0, reference)
        suffix = guidance_suffix(self.guidance_scale)
        results = {metric_key("val", k, self.num_samples, out.nfe, suffix): float(v) for k, v in raw.items()}
        results[f"val/samples_per_s_nfe{out.nfe}{suffix}"] = rate
        self.protocol = sampling_protocol(out, pl_module.num_classes)
        self.protocol["ranks"] = trainer.world_size
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        self.results = results
        return results
