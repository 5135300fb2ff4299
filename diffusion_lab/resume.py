"""What a resume does with a changed setting: applied from the checkpoint's step, or refused.

A resumed run rebuilds everything from the requested config, then Lightning and :class:`ExactResume` restore
weights, EMA, optimizer, LR schedule, loop counters, RNG states and the importance sampler's history from the
checkpoint. A key whose value the restored state would silently override is therefore either re-applied after the
restore or refused; every other key is read from the config and holds from the checkpoint's step on.

=====================================================  ==========================================================
key                                                    on resume with a changed value
=====================================================  ==========================================================
``model``, ``schedule``, ``parameterization``,         refused (``IncompatibleCheckpointError``): they define what
``loss.learned_variance``, ``cond.enabled``            the stored weights mean
``seed``                                               refused: noise, t, label dropout and dropout continue from the
                                                       checkpoint's RNG states
``dataset.*`` except the keys below                    refused: the training examples and the position in their
                                                       order (counted in stored batches) come from the checkpoint
``dataset.{num_workers,root,val_root,download,cache,   applied (where the data is read from, validation size,
num_val,flip}``                                        augmentation)
``time_sampler.{history,num_bins}``                    refused: the importance sampler's loss history is restored
``optim.{lr,betas,eps,weight_decay,warmup_steps}``     applied: written into the restored optimizer's param groups and
                                                       the LR scheduler's base LRs (Lightning restores the stored ones)
everything else (``weighting``, ``ema``, ``trainer``,  applied: read from the config at build time or every step
``eval``, ``callbacks``, ``logger``, …)
``resume``, ``ckpt_path``                              bookkeeping, not recorded
=====================================================  ==========================================================

Each resume is recorded as ``{"step": k, "changed": {key: {"stored": a, "requested": b}}}`` (``k``: the
checkpoint's global step, from which the requested values hold) in every later checkpoint, in ``summary.json``
(``resumed``) and in the W&B run's config (``resumed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.checkpoint_loading import check_resume_compatible, config_diff, load_checkpoint
from diffusion_lab.schema.errors import ConfigError

RESUMES_KEY = "diffusion_lab_resumes"  # the checkpoint's list of resumes (step + changed keys)
BOOKKEEPING = ("resume", "ckpt_path")
OPTIMIZER_KEYS = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.warmup_steps")
_RNG = "noise, t, label dropout and dropout continue from the checkpoint's RNG states"
_DATA = "the training examples and the position in their order (counted in stored batches) come from the checkpoint"
_HISTORY = "the importance sampler's loss history is restored from the checkpoint"
# Longest matching prefix wins; None: applied.
POLICY: dict[str, str | None] = {
    "seed": _RNG,
    "dataset": _DATA,
    **{f"dataset.{k}": None for k in ("num_workers", "root", "val_root", "download", "cache", "num_val", "flip")},
    "time_sampler.history": _HISTORY,
    "time_sampler.num_bins": _HISTORY,
}


class ResumeRefusedError(ConfigError):
    """A resume that changes a key whose value the checkpoint's restored state would override."""


def refusal(key: str) -> str | None:
    """Why a change of ``key`` is refused on resume, or None when the change is applied."""
    matches = [p for p in POLICY if key == p or key.startswith(p + ".")]
    return POLICY[max(matches, key=len)] if matches else None


def resume_changes(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every leaf key whose requested value differs from the stored one: ``{key: {"stored", "requested"}}``."""
    diffs = config_diff(dict(stored), dict(requested))
    return {k: {"stored": a, "requested": b} for k, a, b in diffs if k.split(".")[0] not in BOOKKEEPING}


def check_resume(stored: Mapping[str, Any], cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The changes a resume applies; refuses weight-defining keys (IncompatibleCheckpointError) and keys the
    restored state would override (:class:`ResumeRefusedError`, naming key, stored and requested value)."""
    check_resume_compatible(dict(stored), cfg)
    requested = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(requested, dict)
    changes = resume_changes(stored, {str(k): v for k, v in requested.items()})
    refused = [(k, c, reason) for k, c in changes.items() if (reason := refusal(k)) is not None]
    if refused:
        lines = "\n".join(
            f"  {k}: stored={c['stored']!r} requested={c['requested']!r} ({why})" for k, c, why in refused
        )
        raise ResumeRefusedError(
            f"resume refuses to change these keys:\n{lines}\n"
            "resume with the stored values (drop these overrides), or start a new run without resume/ckpt_path"
        )
    return changes


@dataclass
class ResumePlan:
    """A resume from ``ckpt_path`` at global step ``step``; ``history``: every resume of the run so far, this one
    last (``{"step", "changed"}``). A fresh run has ``ckpt_path=None`` and an empty history."""

    ckpt_path: str | None = None
    step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changes(self) -> dict[str, dict[str, Any]]:
        """The keys this resume changes (``{}`` for a fresh run)."""
        return self.history[-1]["changed"] if self.ckpt_path is not None else {}


def plan_resume(ckpt_path: str | None, cfg: DictConfig) -> ResumePlan:
    """Check ``cfg`` against the checkpoint's stored config (see :func:`check_resume`) and extend its history."""
    if ckpt_path is None:
        return ResumePlan()
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    step = int(ckpt["global_step"])
    changes = check_resume(ckpt["diffusion_lab_config"], cfg)
    history = [*ckpt.get(RESUMES_KEY, []), {"step": step, "changed": changes}]
    return ResumePlan(ckpt_path, step, history)


def apply_optimizer_config(trainer: L.Trainer, optim: Mapping[str, Any]) -> None:
    """Write ``optim`` (lr, betas, eps, weight_decay) into the restored optimizers' param groups and make the LR
    schedulers' base LR ``optim.lr``; the current LR becomes ``lr × schedule factor`` at the restored step (the
    factor uses the requested ``warmup_steps``: a ``LambdaLR``'s lambda is built from the config, not stored)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group.update(betas=tuple(optim["betas"]), eps=optim["eps"], weight_decay=optim["weight_decay"])
            group.update(lr=optim["lr"], initial_lr=optim["lr"])
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.base_lrs = [float(optim["lr"])] * len(scheduler.optimizer.param_groups)
        factors = getattr(scheduler, "lr_lambdas", None)
        for i, group in enumerate(scheduler.optimizer.param_groups):
            factor = factors[i](scheduler.last_epoch) if factors is not None else 1.0
            group["lr"] = scheduler.base_lrs[i] * factor
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]  # what get_last_lr() reports


class ResumeRecord(L.Callback):
    """Stores the run's resume history in every checkpoint and, after Lightning's restore, applies what the
    restored state would override (the optimizer keys) and the logging step of the first resumed batch."""

    def __init__(self, plan: ResumePlan, optim: Mapping[str, Any]) -> None:
        self.plan, self.optim = plan, dict(optim)
        self._first_batch = plan.ckpt_path is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(k.startswith(OPTIMIZER_KEYS) for k in self.plan.changes):
            apply_optimizer_config(trainer, self.optim)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first_batch:
            # Logged rows carry the loop's count of stepped batches, which equals the global step at a batch's
            # start; Lightning's restart heuristics shift it by one when the checkpoint was written at train end.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._first_batch = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RESUMES_KEY] = self.plan.history
