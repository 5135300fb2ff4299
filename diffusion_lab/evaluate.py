"""dlab-evaluate: score a checkpoint on held-out data, print a table and write ``evaluation.json``.

    dlab-evaluate ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt scores=[bpd]
    dlab-evaluate ckpt_path=… scores=[bpd] bpd_method=discrete num_t_samples=null   # all T VLB terms

Metrics: ``bpd`` (bits/dim: the discrete VLB of Ho et al. 2020 for a discrete-time model, the
continuous ELBO of Kingma et al. 2021 otherwise, or as forced by ``bpd_method``).
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

from diffusion_lab.config import ConfigError, LikelihoodMethod, register_configs
from diffusion_lab.metrics import format_count
from diffusion_lab.metrics.likelihood import bits_per_dim
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


def evaluate_bpd(cfg: DictConfig, module: DiffusionModule) -> dict[str, Any]:
    """``{"<split>/bpd@N": …, "<split>/bpd_sem@N": …, "protocol": …}``."""
    data = held_out_data(module, cfg.split, cfg.num_examples)
    denoiser = module.ema_denoiser() if cfg.use_ema else module.denoiser
    method = LikelihoodMethod(cfg.bpd_method).value
    result = bits_per_dim(denoiser, data, cfg.batch_size, method, cfg.num_t_samples, seed=cfg.seed)
    count = format_count(result.num_examples)
    return {
        f"{cfg.split}/bpd@{count}": result.bpd,
        f"{cfg.split}/bpd_sem@{count}": result.sem,
        "protocol": {"bpd": {**result.protocol(), "split": cfg.split, "weights": "EMA" if cfg.use_ema else "raw"}},
    }


EVALUATORS: dict[str, Callable[[DictConfig, DiffusionModule], dict[str, Any]]] = {"bpd": evaluate_bpd}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate every metric in ``cfg.scores`` on ``cfg.ckpt_path``; writes ``evaluation.json``."""
    unknown = [m for m in cfg.scores if m not in EVALUATORS]
    if unknown:
        raise ConfigError(f"unknown scores {unknown}; valid choices: {sorted(EVALUATORS)}")
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
