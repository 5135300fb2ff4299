"""The LightningModule: wires the loss, the network, EMA and the optimizer.

The network is wrapped in a :class:`~diffusion_lab.diffusion.Denoiser` (network + schedule +
parameterization); an EMA copy of the whole denoiser is kept in fp32 beside it, saved in the
checkpoint under ``ema.*`` and used for sampling. Training always continues on the raw weights.
The checkpoint also stores the resolved config (plain containers), so :func:`load_module` rebuilds the
model without pickled objects and loads it with ``torch.load(weights_only=True)``.

A class-conditional model (``cond.enabled=true``) is trained with label dropout (``cond.p_uncond``) so
that it can be sampled with classifier-free guidance (:mod:`diffusion_lab.diffusion.guidance`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_lab.checkpoint_file import FORMAT_KEY, FORMAT_VERSION
from diffusion_lab.diffusion import (
    Denoiser,
    DiffusionLoss,
    NoiseSchedule,
    Parameterization,
    TimeSampler,
    Weighting,
)
from diffusion_lab.diffusion.couplings import IndependentCoupling, OTCoupling
from diffusion_lab.diffusion.guidance import Guidance, GuidedDenoiser, drop_labels
from diffusion_lab.diffusion.priors import GaussianPrior, SourceDistribution
from diffusion_lab.ema import EMAUpdate
from diffusion_lab.samplers import SampleOutput, Sampler
from diffusion_lab.samplers.base import IndexedGenerator
from diffusion_lab.schema.registry import build_option

# Log-SNR bucket edges for the loss-vs-λ curve (Kingma & Gao 2023 plot the loss against λ).
LOG_SNR_EDGES = (-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Generation(SampleOutput):
    """Samples ``x0 (B, ...)`` with their sampling protocol.

    ``nfe``: denoiser calls per sample trajectory (what the sampler's step count implies, and what
    metric keys carry as ``_nfe<N>``); ``y``: the ``(B,)`` labels sampled from, or None for an
    unconditional model; ``guidance_scale``: the classifier-free guidance scale, or None when unguided.
    A guided denoiser call is one batched network call on ``2B`` inputs, so :attr:`network_evals`
    (per sample) is ``2·nfe`` under guidance and ``nfe`` otherwise.
    """

    y: Tensor | None = None
    guidance_scale: float | None = None
    # ``"cfg"`` (classifier-free) or ``"auto"`` (autoguidance) when guided; the σ/α interval it was limited to, and
    # then how many of the nfe calls per sample were guided (None: all of them).
    guidance: str | None = None
    guidance_interval: tuple[float, float] | None = None
    guided_calls: float | None = None

    @property
    def guided(self) -> bool:
        """Whether guidance (classifier-free or autoguidance) was applied."""
        return self.guidance_scale is not None

    @property
    def network_evals(self) -> int | float:
        """Network evaluations per sample: 1 per unguided call, 2 per guided one (conditional + unconditional, or
        main + guide); every call is guided unless a guidance interval limited it (:attr:`guided_calls`)."""
        if not self.guided:
            return self.nfe
        extra = GuidedDenoiser.network_evals_per_call - 1
        evals = self.nfe + extra * (self.nfe if self.guided_calls is None else self.guided_calls)
        return int(evals) if float(evals).is_integer() else evals


def log_snr_bucket_names(edges: Sequence[float] = LOG_SNR_EDGES) -> list[str]:
    """Human-readable bucket names ``"<-10"``, ``"[-10,-5)"``, …, ``">=10"``."""
    inner = [f"[{lo:g},{hi:g})" for lo, hi in itertools.pairwise(edges)]
    return [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]


class DiffusionModule(L.LightningModule):
    """Trains ``denoiser`` with ``loss``; samples with ``sampler`` from the EMA denoiser.

    Args:
        net: the network ``net(x, c_noise, y) -> F̂``.
        schedule, parameterization, weighting, time_sampler: the objective's axes.
        sampler: the default sampler for sample grids and evaluation.
        data_shape: shape of one example, e.g. ``(1, 16, 16)`` or ``(2,)``.
        optim: ``lr, betas, eps, weight_decay, warmup_steps``.
        ema: ``decay, start_step``.
        num_classes: label count of a class-conditional network (None: unconditional).
        p_uncond: label-dropout probability of a conditional model (Ho & Salimans 2022 Alg. 1).
        config: the resolved run config, stored in checkpoints.
        prior: the source distribution ε is drawn from, in training and sampling (default ``N(0, I)``).
        coupling: how a batch's data and source draws are paired (default independent; ``ot``: minibatch OT).
    """

    _bucket_sum: Tensor
    _bucket_count: Tensor

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        parameterization: Parameterization,
        weighting: Weighting,
        time_sampler: TimeSampler,
        sampler: Sampler,
        data_shape: Sequence[int],
        optim: dict[str, Any],
        ema: dict[str, Any],
        num_classes: int | None = None,
        config: dict[str, Any] | None = None,
        log_every_n_steps: int = 25,
        learned_variance: bool = False,
        vlb_weight: float = 0.001,
        p_uncond: float = 0.0,
        prior: SourceDistribution | None = None,
        coupling: IndependentCoupling | OTCoupling | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = Denoiser(net, schedule, parameterization, learned_variance)
        decoder = "discretized" if len(data_shape) == 3 else "gaussian"  # 8-bit images vs. continuous data
        self.prior = prior if prior is not None else GaussianPrior()
        self.loss_fn = DiffusionLoss(
            weighting, time_sampler, vlb_weight=vlb_weight, decoder=decoder, prior=self.prior, coupling=coupling
        )
        self.sampler = sampler
        self.data_shape = tuple(data_shape)
        self.num_classes, self.p_uncond = num_classes, p_uncond
        self.optim_cfg, self.ema_cfg = dict(optim), dict(ema)
        self.config = config
        self.log_every_n_steps = log_every_n_steps
        self.channels_last = False  # set by apply_scale_switches
        self.ema = AveragedModel(
            self.denoiser, multi_avg_fn=get_ema_multi_avg_fn(self.ema_cfg["decay"]), use_buffers=True
        )
        self.ema.requires_grad_(False)
        self._ema_update = EMAUpdate(self.ema, self.denoiser, self.ema_cfg["decay"])
        self.sharded_ema: Any = None  # under trainer=fsdp: a ShardedEMA (diffusion_lab.strategies), set by the strategy
        # A load rewrites the EMA's update counter: re-read it (and the tensor lists) at the next update.
        self.register_load_state_dict_post_hook(lambda module, keys: module._ema_update.reset())
        bins = len(LOG_SNR_EDGES) + 1
        self.register_buffer("_bucket_sum", torch.zeros(bins, dtype=torch.float64), persistent=False)
        self.register_buffer("_bucket_count", torch.zeros(bins, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        if self.channels_last and x0.dim() == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        out = self.loss_fn(self.denoiser, x0, self.training_labels(y))
        if self._logs_this_step():
            self.log("train/loss", out.loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
            for name, term in (("vlb", out.vlb), ("elbo_endpoints", out.endpoints)):
                if term is not None:
                    value = term.detach().mean()
                    self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        self._accumulate_buckets(out.log_snr, out.per_example.detach())
        self._update_time_sampler(out.t, out.unweighted)
        return out.loss

    def _logs_this_step(self) -> bool:
        """Whether this step's values reach a logger: Lightning writes step values every ``log_every_n_steps`` steps (or
        when the run stops), so logging the others only costs time; the last step is logged too, for the summary."""
        trainer = self._trainer
        if trainer is None:
            return True
        last = trainer.max_steps > 0 and self.global_step + 1 >= trainer.max_steps
        return bool(trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False) or last)

    def training_labels(self, y: Tensor) -> Tensor | None:
        """Labels the network trains on: None if unconditional, else ``y (B,)`` with each label replaced by
        the null label with probability ``p_uncond`` (drawn from the global RNG that ``seed_everything`` seeds)."""
        if self.num_classes is None:
            return None
        return drop_labels(y, self.p_uncond, null_label=self.num_classes)

    def _update_time_sampler(self, t: Tensor, losses: Tensor) -> None:
        """Feed a loss-aware time sampler the per-example losses of every rank (Nichol & Dhariwal 2021 §3.3)."""
        if type(self.loss_fn.time_sampler).update is TimeSampler.update:
            return
        if self.trainer.world_size > 1:
            t = torch.as_tensor(self.all_gather(t.detach())).flatten()
            losses = torch.as_tensor(self.all_gather(losses.detach())).flatten()
        self.loss_fn.time_sampler.update(t.detach(), losses.detach())

    def _accumulate_buckets(self, log_snr: Tensor, loss: Tensor) -> None:
        edges = torch.tensor(LOG_SNR_EDGES, device=log_snr.device)
        idx = torch.bucketize(log_snr.float(), edges, right=True)
        self._bucket_sum.index_add_(0, idx, loss.double())
        self._bucket_count.index_add_(0, idx, torch.ones_like(loss, dtype=torch.float64))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: both land before any checkpoint of this step is written
        (callbacks' ``on_train_batch_end`` runs before the module's), so a resumed run continues exactly."""
        super().optimizer_step(*args, **kwargs)
        step = self.global_step + 1  # Lightning counts this step once the hook returns
        if step <= self.ema_cfg["start_step"]:
            self._ema_update.copy()  # before EMA starts, the copy equals the live weights
        else:
            self._ema_update.update()  # = self.ema.update_parameters(self.denoiser), without walking both modules

    def on_train_start(self) -> None:
        self._ema_update.reset()  # the weights are on their device (and sharded) now

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(self.log_every_n_steps, 1) == 0:
            self._log_buckets()

    def _log_buckets(self) -> None:
        total, count = self._bucket_sum.clone(), self._bucket_count.clone()
        if self.trainer.world_size > 1:
            total = torch.as_tensor(self.all_gather(total)).sum(0)
            count = torch.as_tensor(self.all_gather(count)).sum(0)
        for name, s, n in zip(log_snr_bucket_names(), total.tolist(), count.tolist(), strict=True):
            if n > 0:
                self.log(f"train/loss_by_logsnr/{name}", s / n, on_step=True, rank_zero_only=True)
        self._bucket_sum.zero_()
        self._bucket_count.zero_()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        # A fixed generator per batch makes the validation loss comparable across evaluations.
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        # Conditional models are validated on their labels (no dropout): the loss of p(x | y).
        out = self.loss_fn(self.ema_denoiser(), x0, y if self.num_classes is not None else None, generator=gen)
        self.log("val/loss_ema", out.loss, on_epoch=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
        )
        warmup = int(cfg["warmup_steps"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------- sampling
    def configure_model(self) -> None:
        """Under ``trainer=fsdp``: the strategy shards the denoiser and its EMA copy per block (FSDP2); else a no-op."""
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)

    def ema_denoiser(self) -> Denoiser:
        """The EMA copy of the denoiser (what sampling and evaluation use); a sharded copy (``trainer=fsdp``) is
        gathered into one plain module once per training step (a collective: every rank calls this at that step)."""
        module = self.ema.module
        if self.sharded_ema is not None:
            module = self.sharded_ema.gather(module, self.global_step, self.device)
        assert isinstance(module, Denoiser)
        return module

    @torch.no_grad()
    def generate(
        self,
        indices: Sequence[int],
        seed: int = 0,
        sampler: Sampler | None = None,
        use_ema: bool = True,
        progress: bool = False,
        *,
        class_labels: Sequence[int] | None = None,
        guidance_scale: float | None = None,
        guidance: Guidance | None = None,
    ) -> Generation:
        """Sample one example per index; example ``i`` depends only on ``(seed, i)`` (EDM's pattern).

        A class-conditional model samples example ``i`` from label ``class_labels[i % len(class_labels)]``
        (default ``0, 1, …, num_classes − 1``: every class equally often; label ``num_classes`` is the null
        label, i.e. the unconditional model). ``guidance_scale`` w wraps the denoiser in a
        :class:`GuidedDenoiser` (classifier-free guidance), which works with every sampler; ``guidance`` (which
        overrides it) may also name a guide model (autoguidance) and a σ/α interval.

        Returns samples ``(len(indices), *data_shape)``, their labels, NFE and guidance (:class:`Generation`).
        """
        sampler = sampler or self.sampler
        base = self.ema_denoiser() if use_ema else self.denoiser
        y = self.sample_labels(indices, class_labels)
        if guidance is None and guidance_scale is not None:
            guidance = Guidance(guidance_scale)
        denoiser = base if guidance is None else guidance.wrap(base, self.num_classes)
        was_training = base.training
        base.eval()
        denoiser.eval()
        gen = IndexedGenerator([seed * 1_000_003 + int(i) for i in indices], device=self.device)
        x_T = sampler.prior((len(indices), *self.data_shape), denoiser.schedule, gen, self.device, self.prior)
        out = sampler.sample(denoiser, x_T, y=y, generator=gen, progress=progress)
        base.train(was_training)
        if guidance is None:
            return Generation(out.x0, out.nfe, y=y)
        return Generation(
            out.x0, out.nfe, y=y, guidance_scale=guidance.scale, guidance=guidance.kind,
            guidance_interval=guidance.interval, guided_calls=getattr(denoiser, "guided_calls", None),
        )  # fmt: skip

    def sample_labels(self, indices: Sequence[int], class_labels: Sequence[int] | None = None) -> Tensor | None:
        """Labels ``(len(indices),)`` long for sample indices, cycling over ``class_labels`` (default all classes).

        None for an unconditional model (which refuses ``class_labels``).
        """
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(f"class_labels={list(class_labels)} given, but this model is unconditional")
            return None
        labels = list(range(self.num_classes)) if class_labels is None else [int(c) for c in class_labels]
        if not labels or not all(0 <= c <= self.num_classes for c in labels):
            raise ValueError(
                f"class_labels must be a non-empty list of labels in 0..{self.num_classes - 1} "
                f"(or {self.num_classes}, the null label), got {labels}"
            )
        return torch.tensor([labels[int(i) % len(labels)] for i in indices], dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffusion_lab_config"] = self.config
        checkpoint[FORMAT_KEY] = FORMAT_VERSION
        checkpoint["data_shape"] = list(self.data_shape)
        checkpoint["time_sampler"] = self.loss_fn.time_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_fn.time_sampler.load_state_dict(checkpoint.get("time_sampler", {}))


def build_module(cfg: DictConfig, data_shape: Sequence[int]) -> DiffusionModule:
    """Instantiate every axis of ``cfg`` into a :class:`DiffusionModule`.

    The model is class-conditional exactly when ``cfg.model.num_classes`` is set (``cond.enabled=true``
    fills it from the dataset, see :func:`set_num_classes`); it then trains with label dropout ``cond.p_uncond``.
    """
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    return DiffusionModule(
        net=build_network(cfg.model, data_shape, cfg.loss.learned_variance),
        schedule=build_option("schedule", cfg.schedule),
        parameterization=build_option("parameterization", cfg.parameterization),
        weighting=build_option("weighting", cfg.weighting),
        time_sampler=build_option("time_sampler", cfg.time_sampler),
        sampler=build_option("sampler", cfg.sampler),
        data_shape=data_shape,
        optim=container["optim"],
        ema=container["ema"],
        num_classes=cfg.model.get("num_classes"),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        config={str(k): v for k, v in container.items()},
        learned_variance=cfg.loss.learned_variance,
        vlb_weight=cfg.loss.vlb_weight,
        p_uncond=cfg.cond.p_uncond,
        prior=build_option("prior", cfg.prior),
        coupling=build_option("coupling", cfg.coupling),
    )


def set_num_classes(cfg: DictConfig, dataset_num_classes: int | None) -> None:
    """``cond.enabled=true``: condition the network on the dataset's labels (``model.num_classes`` := the
    dataset's label count, recorded in the checkpoint's config). A no-op for an unconditional run."""
    if not cfg.cond.enabled:
        return
    if dataset_num_classes is None:
        raise ValueError("cond.enabled=true needs a dataset with class labels")
    cfg.model.num_classes = int(dataset_num_classes)


def build_network(model_cfg: DictConfig, data_shape: Sequence[int], learned_variance: bool) -> nn.Module:
    """Instantiate the network; a learned reverse variance doubles its output channels (dim 1)."""
    if not learned_variance:
        return build_option("model", model_cfg)
    key = "out_channels" if "out_channels" in model_cfg else "out_dim"
    return build_option("model", model_cfg, extra={key: 2 * int(data_shape[0])})


def apply_scale_switches(module: DiffusionModule, compile: bool = False, channels_last: bool = False) -> None:
    """``channels_last``: image network weights (and training batches) in NHWC;
    ``compile``: ``torch.compile`` the live network in place (state-dict keys unchanged; EMA stays eager)."""
    if channels_last and len(module.data_shape) == 3:
        module.denoiser.to(memory_format=torch.channels_last)
        module.channels_last = True
    if compile:
        module.denoiser.net.compile()


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps`` optimizer steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
