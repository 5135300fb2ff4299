"""Experiment tracking: the run's loggers (CSV + W&B) and its local ``summary.json``.

Every run is described the same way to W&B and to the local summary, so a sweep can be tabulated
from either (``scripts/make_table.py``):

- ``group``: the sweep (``logger.wandb.group`` if set; in a Hydra multirun ``<name>/<sweep dir>``, or the
  sweep dir's name when it already is ``name``; else ``name``);
- ``job_type``: ``train`` / ``sample`` / ``eval`` by entry point (``logger.wandb.job_type`` overrides);
- ``tags``: one ``axis:option`` per ablation axis chosen through Hydra's config groups
  (``schedule:cosine``, ``parameterization:v``) plus one ``key:value`` per plain command-line override
  (``weighting.gamma:5``), then ``logger.wandb.tags``;
- the full resolved config, Hydra's group choices and overrides, and the final metrics.

A ``sample`` / ``eval`` job (:func:`track_job`) joins its training run's group unless it is itself a sweep,
adds the training run's tags for the axes it does not set itself, and records the training run (directory,
config, W&B id). :func:`read_offline_run` reads a W&B offline run back (group, tags, config, summary), so
tables can be built from W&B's own record without the network.

Nothing here imports the diffusion code; it only needs the composed config.

The package: :mod:`~diffusion_lab.tracking.filing` (how a run is described: group, job type, tags),
:mod:`~diffusion_lab.tracking.writers` (the loggers, ``summary.json`` and the W&B run of a job) and
:mod:`~diffusion_lab.tracking.offline` (reading a W&B offline run back); every name is importable from here.
"""

from diffusion_lab.tracking.filing import (
    ABLATION_AXES,
    SUMMARY_FILE,
    RunInfo,
    ablation_tags,
    hydra_context,
    job_info,
    run_info,
    sweep_group,
    training_run,
)
from diffusion_lab.tracking.offline import read_offline_run
from diffusion_lab.tracking.writers import (
    WANDB_FLUSH_INTERVAL_S,
    AppendingCSVLogger,
    build_loggers,
    finish_run,
    objective,
    resolved_config,
    scalar_metrics,
    track_job,
    wandb_mode,
    write_run_summary,
    write_summary,
)

__all__ = [
    "ABLATION_AXES",
    "SUMMARY_FILE",
    "WANDB_FLUSH_INTERVAL_S",
    "AppendingCSVLogger",
    "RunInfo",
    "ablation_tags",
    "build_loggers",
    "finish_run",
    "hydra_context",
    "job_info",
    "objective",
    "read_offline_run",
    "resolved_config",
    "run_info",
    "scalar_metrics",
    "sweep_group",
    "track_job",
    "training_run",
    "wandb_mode",
    "write_run_summary",
    "write_summary",
]
