"""dlab-evaluate: score a checkpoint on held-out data, print a table and write ``evaluation.json``.

    dlab-evaluate ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt scores=[bpd]
    dlab-evaluate ckpt_path=… scores=[bpd] bpd_method=discrete num_t_samples=null   # all T VLB terms
    dlab-evaluate ckpt_path=… scores=[bpd] bpd_method=ode num_examples=1000         # PF-ODE likelihood

Metrics: ``bpd`` (bits/dim: the discrete VLB of Ho et al. 2020 for a discrete-time model, the
continuous ELBO of Kingma et al. 2021 otherwise, or as forced by ``bpd_method``), logged as
``<split>/bpd@N``. ``bpd_method=ode`` computes the likelihood of the probability-flow ODE model instead
(Song et al. 2021 App. D.2; images uniformly dequantised, an 8-bit bound), logged as ``<split>/bpd_ode@N``
with the solver, tolerances, probe and NFE in its protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.config import ConfigError, HutchinsonProbe, LikelihoodMethod, register_configs
from diffusion_lab.diffusion.ode_likelihood import ODELikelihoodOptions
from diffusion_lab.metrics import format_count
from diffusion_lab.metrics.likelihood import BitsPerDim, bits_per_dim
from diffusion_lab.module import DiffusionModule, load_module
from diffusion_lab.train import CONFIG_DIR

SPLITS = ("train", "val")


def held_out_data(module: DiffusionModule, split: str, num_examples: int | None) -> Any:
    """The run's dataset split as a tensor, rebuilt from the checkpoint's stored config."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not supported; valid choices: {list(SPLITS)}")
    assert module.config is not None
    datamodule = instantiate(OmegaConf.create(module.config)["dataset"])
    data = datamodule.val_tensor() if split == "val" else datamodule.train_tensor()
    return data[:num_examples] if num_examples is not None else data


def ode_options(cfg: DictConfig) -> ODELikelihoodOptions:
    """The ``ode_*`` keys as :class:`ODELikelihoodOptions`; an out-of-range value is a :class:`ConfigError`."""
    try:
        return ODELikelihoodOptions(
            t_eps=cfg.ode_t_eps,
            rtol=cfg.ode_rtol,
            atol=cfg.ode_atol,
            probe=HutchinsonProbe(cfg.ode_probe).value,
            exact_trace=cfg.ode_exact_trace,
        )
    except ValueError as err:
        raise ConfigError(f"bpd_method=ode: {err}") from err


def _bits_per_dim(cfg: DictConfig, denoiser: Any, data: Any, method: str) -> BitsPerDim:
    """Bits/dim by ``method``: the ELBO ones with ``num_t_samples``, ``ode`` with the ``ode_*`` keys."""
    if method == LikelihoodMethod.ode.value:
        options = ode_options(cfg)
        return bits_per_dim(
            denoiser, data, cfg.batch_size, method, seed=cfg.seed, ode=options, dequantize=cfg.ode_dequantize
        )
    return bits_per_dim(denoiser, data, cfg.batch_size, method, cfg.num_t_samples, seed=cfg.seed)


def evaluate_bpd(cfg: DictConfig, module: DiffusionModule) -> dict[str, Any]:
    """``{"<split>/bpd@N": …, "<split>/bpd_sem@N": …, "protocol": …}``; ``bpd_ode`` for ``bpd_method=ode``."""
    data = held_out_data(module, cfg.split, cfg.num_examples)
    denoiser = module.ema_denoiser() if cfg.use_ema else module.denoiser
    method = LikelihoodMethod(cfg.bpd_method).value
    result = _bits_per_dim(cfg, denoiser, data, method)
    name = "bpd_ode" if method == LikelihoodMethod.ode.value else "bpd"
    count = format_count(result.num_examples)
    return {
        f"{cfg.split}/{name}@{count}": result.bpd,
        f"{cfg.split}/{name}_sem@{count}": result.sem,
        "protocol": {name: {**result.protocol(), "split": cfg.split, "weights": "EMA" if cfg.use_ema else "raw"}},
    }


EVALUATORS: dict[str, Callable[[DictConfig, DiffusionModule], dict[str, Any]]] = {"bpd": evaluate_bpd}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate every metric in ``cfg.scores`` on ``cfg.ckpt_path``; writes ``evaluation.json``."""
    unknown = [m for m in cfg.scores if m not in EVALUATORS]
    if unknown:
        raise ConfigError(f"unknown scores {unknown}; valid choices: {sorted(EVALUATORS)}")
    if LikelihoodMethod(cfg.bpd_method) == LikelihoodMethod.ode:
        ode_options(cfg)  # fail on a bad ode_* value before the checkpoint and data are loaded
    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    results: dict[str, Any] = {"checkpoint": str(cfg.ckpt_path), "protocol": {}}
    for name in cfg.scores:
        out = EVALUATORS[name](cfg, module)
        results["protocol"].update(out.pop("protocol"))
        results.update(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The numeric results as a two-column Markdown table."""
    rows = [(k, v) for k, v in sorted(results.items()) if isinstance(v, float | int)]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"| {'metric':<{width}} | value    |", f"|{'-' * (width + 2)}|----------|"]
    lines += [f"| {k:<{width}} | {v:8.4f} |" for k, v in rows]
    return "\n".join(lines)


register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point ``dlab-evaluate``."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    results = run(cfg, out_dir)
    print(format_table(results))
    print(f"wrote {out_dir / 'evaluation.json'}")


if __name__ == "__main__":
    main()
