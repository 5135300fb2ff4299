"""dlab-phema: post-hoc EMA reconstruction (Karras et al. 2024 §3, Alg. 3) of a run trained with ``ema=posthoc``.

    dlab-phema run_dir=outputs/digits/<run> sigma_rel=0.02,0.05,0.10,0.15

For each σ_rel, the EMA at the last snapshot's training time is the combination ``Σ_i X_i θ̂_i`` of every stored
snapshot ``θ̂_i`` (each a power-function EMA of the weights at some time and σ_rel) whose coefficients solve the least
squares fit of the wanted profile (:func:`diffusion_lab.phema.solve_coefficients`, columns normalised to sum to 1);
buffers come from the last snapshot. The result is written as ``<run>/phema/phema-<σ_rel>.ckpt``: the run's
``last.ckpt`` with its EMA weights replaced and ``ema.posthoc.sigma_rel`` set in its stored config (so a table can use
``train.ema.posthoc.sigma_rel`` as an axis), atomically and with checksums, loadable by every entry point.

The config is checked (ranges, the run's snapshots and checkpoint) before torch is imported.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from diffusion_lab.config import check_domains, register_configs
from diffusion_lab.phema import profile_inner_product, sigma_rel_to_gamma, solve_coefficients
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

SNAPSHOTS = Path("phema") / "snapshots"  # as diffusion_lab.callbacks.phema.SNAPSHOT_DIR (which imports Lightning)
SNAPSHOT_FILE = re.compile(r"phema-(\d{12})\.pt")
EMA_PREFIX = "ema.module."  # the module's EMA copy of the denoiser in a checkpoint's state_dict

register_configs()


def snapshot_files(run_dir: Path) -> list[Path]:
    """The run's snapshots ``<run_dir>/phema/snapshots/phema-<images>.pt``, in training time."""
    directory = run_dir / SNAPSHOTS
    files = [p for p in directory.glob("phema-*.pt") if SNAPSHOT_FILE.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(files)


def base_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt``, or the run's ``checkpoints/last.ckpt``."""
    return Path(cfg.ckpt) if cfg.ckpt else Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def check_phema_request(cfg: DictConfig) -> None:
    """Torch-free: the ranges, a run directory with snapshots and the checkpoint to copy; raise :class:`ConfigError`."""
    check_domains(cfg)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir}: no such directory (valid: a run directory of dlab-train)")
    snapshots = snapshot_files(run_dir)
    if len(snapshots) < 2:
        raise ConfigError(
            f"run_dir={run_dir}: {len(snapshots)} post-hoc EMA snapshot(s) in {run_dir / SNAPSHOTS}; a reconstruction "
            "needs at least 2 (train with ema=posthoc, and ema.posthoc.snapshot_every below the run's training images)"
        )
    if not base_checkpoint(cfg).is_file():
        raise ConfigError(f"ckpt={base_checkpoint(cfg)}: no such checkpoint (valid: null for the run's last.ckpt)")


def list_argument(argv: list[str], key: str = "sigma_rel") -> list[str]:
    """``key=0.05,0.10`` (or ``key=0.05``) → ``key=[0.05,0.10]``: Hydra reads a bare comma list as a sweep."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        out.append(f"{name}=[{value}]" if sep and name == key and not value.startswith("[") else arg)
    return out


# ------------------------------------------------------------------------------------------ reconstruction


def read_snapshot(path: Path, mmap: bool = False) -> dict[str, Any]:
    """One snapshot, weights-only, checksum verified (unless ``mmap``: header reads); a foreign file is refused."""
    from diffusion_lab.callbacks.phema import SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_KEY
    from diffusion_lab.checkpoint_file import CheckpointError, read_checkpoint

    record = read_checkpoint(path, mmap=mmap)
    if record.get(SNAPSHOT_FORMAT_KEY) != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path}: not a post-hoc EMA snapshot of format {SNAPSHOT_FORMAT}")
    return record


def fit_error(in_time: list[float], in_sigma: list[float], out_time: float, out_sigma: float, x: np.ndarray) -> float:
    """Relative L2 error ``‖Σ x_i p_i − p_out‖ / ‖p_out‖`` of a reconstructed profile (from the inner products)."""
    import numpy as np

    t, g = np.asarray(in_time, dtype=np.float64), sigma_rel_to_gamma(in_sigma)
    g_out = float(sigma_rel_to_gamma(out_sigma))
    gram = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    cross = profile_inner_product(t, g, out_time, g_out)
    norm = profile_inner_product(out_time, g_out, out_time, g_out)
    return float(np.sqrt(max(x @ gram @ x - 2 * x @ cross + norm, 0.0) / norm))


def reconstruct(paths: list[Path], out_sigma_rels: list[float]) -> dict[str, Any]:
    """The EMAs at ``out_sigma_rels`` at the last snapshot's time from the snapshots ``paths`` (streamed, one file
    read at a time): ``{"emas": [{name: fp32 tensor}], "buffers", "nimg", "step", "inputs", "coefficients",
    "errors"}``; the inputs are every (snapshot, tracked σ_rel) pair."""
    import torch

    headers = [read_snapshot(p, mmap=True) for p in paths]
    in_time = [float(h["nimg"]) for h in headers for _ in h["sigma_rels"]]
    in_sigma = [float(s) for h in headers for s in h["sigma_rels"]]
    out_time = float(headers[-1]["nimg"])
    x = solve_coefficients(in_time, in_sigma, out_time, out_sigma_rels)  # (inputs, outputs)
    emas: list[dict[str, Tensor]] = [{} for _ in out_sigma_rels]
    row = 0
    for path in paths:
        snapshot = read_snapshot(path)
        for ema in snapshot["emas"]:
            for j, out in enumerate(emas):
                for name, value in ema.items():
                    out[name] = out.get(name, torch.zeros(value.shape)) + float(x[row, j]) * value.float()
            row += 1
    errors = [fit_error(in_time, in_sigma, out_time, s, x[:, j]) for j, s in enumerate(out_sigma_rels)]
    return {
        "emas": emas, "buffers": snapshot["buffers"], "nimg": int(headers[-1]["nimg"]),
        "step": int(headers[-1]["step"]), "inputs": len(in_time), "coefficients": x, "errors": errors,
    }  # fmt: skip


def with_posthoc_ema(base: dict[str, Any], ema: dict[str, Tensor], buffers: dict[str, Tensor]) -> dict[str, Any]:
    """A copy of checkpoint ``base`` whose EMA weights (``ema.module.*``) are ``ema`` and ``buffers``, in the stored
    dtypes; every tracked name must be one of its EMA entries."""
    state = dict(base["state_dict"])
    for name, value in {**ema, **buffers}.items():
        key = EMA_PREFIX + name
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"the snapshots' {name} {tuple(value.shape)} does not fit the checkpoint's EMA weights")
        state[key] = value.to(state[key].dtype)
    return {**base, "state_dict": state}


def write_checkpoints(cfg: DictConfig) -> list[dict[str, Any]]:
    """Reconstruct every ``cfg.sigma_rel`` and write one checkpoint each; returns what each holds."""
    from diffusion_lab.checkpoint_file import atomic_torch_save, with_checksum
    from diffusion_lab.checkpoint_loading import load_checkpoint

    sigmas = sorted({float(s) for s in cfg.sigma_rel})
    paths = snapshot_files(Path(cfg.run_dir))
    result = reconstruct(paths, sigmas)
    base = load_checkpoint(base_checkpoint(cfg))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run_dir) / "phema"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sigma, ema, error in zip(sigmas, result["emas"], result["errors"], strict=True):
        ckpt = with_posthoc_ema(base, ema, result["buffers"])
        config = json.loads(json.dumps(ckpt["diffusion_lab_config"]))  # a deep copy of plain containers
        config["ema"].setdefault("posthoc", {})["sigma_rel"] = sigma
        record = {
            "sigma_rel": sigma, "gamma": float(sigma_rel_to_gamma(sigma)), "images": result["nimg"],
            "snapshot_step": result["step"], "checkpoint_step": int(base.get("global_step", -1)),
            "snapshots": len(paths), "profiles": result["inputs"], "profile_error": error,
        }  # fmt: skip
        path = out_dir / f"phema-{sigma:.3f}.ckpt"
        atomic_torch_save(with_checksum({**ckpt, "diffusion_lab_config": config, "phema": record}), path)
        written.append({**record, "path": str(path)})
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="phema")
def _main(cfg: DictConfig) -> None:
    check_phema_request(cfg)  # before torch is imported
    for record in write_checkpoints(cfg):
        print(json.dumps(record))
        if record["snapshot_step"] != record["checkpoint_step"]:
            print(
                f"warning: EMA reconstructed at step {record['snapshot_step']} (the last snapshot), raw weights of "
                f"step {record['checkpoint_step']} (the checkpoint)",
                file=sys.stderr,
            )


def main() -> None:
    """``dlab-phema run_dir=… sigma_rel=0.02,0.05``: one checkpoint per σ_rel (see the module docstring)."""
    sys.argv = [sys.argv[0], *list_argument(sys.argv[1:])]
    _main()


if __name__ == "__main__":  # python -m diffusion_lab.phema_cli …: the same entry point as dlab-phema
    main()
