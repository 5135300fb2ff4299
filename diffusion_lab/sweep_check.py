"""Check every job of a ``dlab-train -m`` sweep before the first one starts.

Hydra composes a sweep's jobs one at a time, as it launches them, so a value out of range in job 7 would stop the
sweep after six jobs had trained. :class:`ValidateSweep` (a Hydra callback, ``hydra.callbacks`` in conf/train.yaml)
expands the grid of the basic sweeper the way the sweeper will, composes each job and runs :func:`validate_config`
on it, so the whole sweep is refused up front, naming the job and its overrides. A search sweeper (Optuna) draws its
values while it runs; there is nothing to expand, and its jobs are checked when they start.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from diffusion_lab.config import validate_config
from diffusion_lab.schema.errors import ConfigError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job the basic sweeper will launch (its ``params`` and the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = config.hydra.sweeper.get("params")
    arguments = [f"{key}={value}" for key, value in (params or {}).items()]
    arguments += list(config.hydra.overrides.task)
    loader = GlobalHydra.instance().config_loader()
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_sweep(config: DictConfig, jobs: list[list[str]]) -> None:
    """Compose and validate each job; raise :class:`ConfigError` naming the first bad one."""
    loader = GlobalHydra.instance().config_loader()
    for number, overrides in enumerate(jobs):
        try:
            job = loader.load_sweep_config(config, overrides)
        except Exception:  # a composition error: Hydra reports it itself, with the valid choices, at that job
            continue
        with open_dict(job):
            del job["hydra"]  # the launcher's node; its ${hydra:…} values resolve only in a running job
        try:
            validate_config(job)
        except ConfigError as err:
            raise ConfigError(
                f"sweep job {number} of {len(jobs)} ({' '.join(overrides)}): {err}; no job was started"
            ) from err


class ValidateSweep(Callback):
    """Hydra callback: :func:`check_sweep` over every job of a basic sweep before the first job runs.

    Hydra turns an exception raised in a callback into a warning and carries on, so a refused sweep exits here,
    with status 1 and the message on stderr, as a refused single run does.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return
        try:
            check_sweep(config, sweep_jobs(config))
        except ConfigError as err:
            print(f"Error in the sweep: {err}", file=sys.stderr)
            raise SystemExit(1) from err
