"""What every entry point runs first, torch-free: the config checks and the hardware the config asks for.

``dlab-train``, ``dlab-sample``, ``dlab-evaluate`` and ``dlab-tune-grid`` (and ``python -m diffusion_lab.train`` …,
the same ``main`` of each entry module) compose their config with Hydra (a mistyped key or option fails there,
with the valid list) and validate it here: the ranges declared beside every field, impossible combinations, the
GPU or device asked for. Only then do they import the training stack (Lightning alone takes seconds to import), so
a typo or an out-of-range value costs about a second. This module imports no entry module.

    dlab-train experiment=toy2d schedule=cosine
    dlab-sample ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt sampler=dpm_solver
    dlab-evaluate ckpt_path=… scores=[bpd]
    dlab-tune-grid ckpt_path=… sampler=dpm_solver sampler.steps=10   # then sampler.grid=tuned in dlab-sample
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_lab.config import (
    check_domains,
    check_evaluate_request,
    check_guidance_request,
    register_configs,
    validate_config,
)
from diffusion_lab.schema.domains import DEVICES
from diffusion_lab.schema.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")

register_configs()


def check_hardware(cfg: DictConfig, cuda_devices: int | None = None) -> None:
    """Refuse a trainer that asks for GPUs the machine does not have (before Lightning is imported).

    Args:
        cfg: the composed training config.
        cuda_devices: the number of CUDA devices visible here; None: ask ``torch.cuda.device_count()`` (torch is
            imported only when the trainer asks for a GPU).
    """
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in GPU_ACCELERATORS:
        return
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    if cuda_devices > 0:
        return
    what = f"trainer.accelerator={accelerator}"
    raise ConfigError(
        f"{what} needs a CUDA GPU, and this machine has none (torch.cuda.device_count() == 0); on a CPU use "
        "trainer=cpu, or trainer=ddp|fsdp trainer.accelerator=cpu trainer.devices=N for N processes"
    )


def route_lightning_logs() -> None:
    """Send Lightning's log records through the root logger Hydra configured (console + ``<run>/train.log``).

    Imported before Hydra set logging up (``python -m diffusion_lab.train``), Lightning gives its loggers a
    console handler of their own and stops them propagating, which leaves ``train.log`` without its messages.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.out_dir`` when set, else the Hydra job's output directory."""
    out_dir = cfg.get("out_dir")
    return Path(out_dir) if out_dir else Path(HydraConfig.get().runtime.output_dir)


def check_device(key: str, device: str, cuda_devices: int | None = None, mps: bool | None = None) -> None:
    """Refuse a device (set at ``key``) the machine does not have, before anything is loaded onto it.

    Args:
        key: the config key, for the message.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (the form is the field's domain rule).
        cuda_devices: CUDA devices visible here; None: ``torch.cuda.device_count()`` (torch is imported only when a
            GPU is asked for).
        mps: whether Apple's Metal backend is there; None: ask torch (only for ``mps``).
    """
    if device == "cpu":
        return
    if device == "mps":
        if mps is None:
            import torch

            mps = torch.backends.mps.is_available()
        if not mps:
            raise ConfigError(f"{key}=mps needs Apple's Metal backend, which this machine lacks; valid here: cpu")
        return
    index = int(device.partition(":")[2] or 0)
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    if index >= cuda_devices:
        here = ["cpu", *(["cuda"] if cuda_devices else []), *(f"cuda:{i}" for i in range(cuda_devices))]
        raise ConfigError(
            f"{key}={device} needs CUDA device {index}, and this machine has {cuda_devices} "
            f"(torch.cuda.device_count() == {cuda_devices}); valid here: {here} (the forms: {list(DEVICES)})"
        )


def validate_train(cfg: DictConfig) -> None:
    """``dlab-train``: the trainer's hardware, then :func:`~diffusion_lab.config.validate_config` (ranges and
    combinations first, torch-free; the objective's and the dataset's own checks build them, which imports torch)."""
    check_hardware(cfg)
    validate_config(cfg)


def validate_sample(cfg: DictConfig) -> None:
    """``dlab-sample``: every range rule of :class:`~diffusion_lab.schema.jobs.SampleConfig`, the guidance keys
    together (:func:`~diffusion_lab.config.check_guidance_request`), then the device."""
    check_domains(cfg)
    check_guidance_request(cfg)
    check_device("device", cfg.device)


def validate_evaluate(cfg: DictConfig) -> None:
    """``dlab-evaluate``: the rules of :class:`~diffusion_lab.schema.jobs.EvaluateConfig`, the combinations of the
    scores (:func:`~diffusion_lab.config.check_evaluate_request`), then the device."""
    check_domains(cfg)
    check_evaluate_request(cfg)
    check_guidance_request(cfg)
    check_device("device", cfg.device)


def validate_tune_grid(cfg: DictConfig) -> None:
    """``dlab-tune-grid``: every range rule of :class:`~diffusion_lab.schema.jobs.TuneGridConfig`, then the device."""
    check_domains(cfg)
    check_device("device", cfg.device)
