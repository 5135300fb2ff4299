"""dlab-evaluate: score a checkpoint on held-out data, print a table and write ``evaluation.json``.

    dlab-evaluate ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt scores=[bpd]
    dlab-evaluate ckpt_path=… scores=[bpd] bpd_method=discrete num_t_samples=null   # all T VLB terms
    dlab-evaluate ckpt_path=… scores=[bpd] bpd_method=ode num_examples=1000         # PF-ODE likelihood

    dlab-evaluate ckpt_path=… scores=[fid,bpd] sampler=ddim sampler.steps=50 num_samples=1000 \
        metrics.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth
    dlab-evaluate ckpt_path=… scores=[fd_digits] num_samples=1000                # digits Fréchet distance
    dlab-evaluate ckpt_path=… scores=[fid] ref_stats_only=true num_samples=1000  # cache reference stats, exit

Sample-quality scores (``fid``: FID/IS/KID through torch-fidelity with the ``metrics`` options, plus the noise
floor ``fid_floor@N``; ``fd_digits``; ``toy2d``) draw ``num_samples`` index-seeded EMA samples once with
``sampler`` (default: the run's) and score them against the training split, logged as ``val/<name>@N_nfeK``.

Metrics: ``bpd`` (bits/dim: the discrete VLB of Ho et al. 2020 for a discrete-time model, the
continuous ELBO of Kingma et al. 2021 otherwise, or as forced by ``bpd_method``), logged as
``<split>/bpd@N``. ``bpd_method=ode`` computes the likelihood of the probability-flow ODE model instead
(Song et al. 2021 App. D.2; images uniformly dequantised, an 8-bit bound), logged as ``<split>/bpd_ode@N``
with the solver, tolerances, probe and NFE in its protocol.

The job is recorded like a training run: ``summary.json`` in the output directory and a W&B run with
``job_type=eval`` in the training run's group (or the job's own sweep), the metrics in its summary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.atomic import atomic_write_json
from diffusion_lab.cli import output_dir, validate_evaluate
from diffusion_lab.config import DIGITS_METRIC_RESIZE, check_guidance, check_prdc_scores
from diffusion_lab.run_dir import prepare_output_dir, run_lock
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.jobs import PRDC_SCORES, SAMPLE_SCORES, SPLITS, HutchinsonProbe, LikelihoodMethod
from diffusion_lab.schema.registry import CONFIG_DIR, build_option, option_class, option_config
from diffusion_lab.schema.sources import LIKELIHOOD_REASON

if TYPE_CHECKING:
    from diffusion_lab.diffusion.ode_likelihood import ODELikelihoodOptions
    from diffusion_lab.metrics.likelihood import BitsPerDim
    from diffusion_lab.module import DiffusionModule

EVALUATION_FILE = "evaluation.json"


def held_out_data(module: DiffusionModule, split: str, num_examples: int | None) -> Any:
    """The run's dataset split as a tensor, rebuilt from the checkpoint's stored config."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not supported; valid choices: {list(SPLITS)}")
    assert module.config is not None
    datamodule = build_option("dataset", module.config["dataset"])
    data = datamodule.val_tensor() if split == "val" else datamodule.train_tensor()
    return data[:num_examples] if num_examples is not None else data


def ode_options(cfg: DictConfig) -> ODELikelihoodOptions:
    """The ``ode_*`` keys as :class:`ODELikelihoodOptions`; an out-of-range value is a :class:`ConfigError`."""
    from diffusion_lab.diffusion.ode_likelihood import ODELikelihoodOptions

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
    from diffusion_lab.metrics.likelihood import bits_per_dim

    if method == LikelihoodMethod.ode.value:
        options = ode_options(cfg)
        return bits_per_dim(
            denoiser, data, cfg.batch_size, method, seed=cfg.seed, ode=options, dequantize=cfg.ode_dequantize
        )
    return bits_per_dim(denoiser, data, cfg.batch_size, method, cfg.num_t_samples, seed=cfg.seed)


def evaluate_bpd(cfg: DictConfig, module: DiffusionModule) -> dict[str, Any]:
    """``{"<split>/bpd@N": …, "<split>/bpd_sem@N": …, "protocol": …}``; ``bpd_ode`` for ``bpd_method=ode``."""
    from diffusion_lab.metrics.base import format_count

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


# Likelihood score -> its evaluation (the names: schema.jobs.LIKELIHOOD_SCORES, the rule of ``scores``).
EVALUATORS: dict[str, Callable[[DictConfig, DiffusionModule], dict[str, Any]]] = {"bpd": evaluate_bpd}


def sample_metric(cfg: DictConfig, module: DiffusionModule, score: str, datamodule: Any) -> Any:
    """The metric of ``score``: ``cfg.metrics`` if it is that option, else the run's, else the option's defaults
    (the digits resize rule taken from the run's dataset)."""
    option = SAMPLE_SCORES[score]
    target = option_config("metrics", option)._target_
    assert module.config is not None
    run_metrics = OmegaConf.create(module.config).get("metrics")
    node = next((n for n in (cfg.metrics, run_metrics) if n is not None and n.get("_target_") == target), None)
    if node is None:
        node = option_config("metrics", option)
        resize = OmegaConf.create(module.config)["dataset"].get("resize")
        if option == "digits_fd" and resize is not None:
            node.resize = DIGITS_METRIC_RESIZE[str(resize)]
    if any(s in PRDC_SCORES for s in cfg.scores):  # on in the one feature space they are reported in
        on = score == sample_scores_of(list(cfg.scores), module.data_shape)[0]
        node = OmegaConf.merge(node, {"prc" if option == "fid" else "prdc": on})
    log_prob = getattr(datamodule, "log_prob", None)
    takes_log_prob = "log_prob" in inspect.signature(option_class("metrics", node)).parameters
    extra = {"log_prob": log_prob} if log_prob is not None and takes_log_prob else {}
    metric = build_option("metrics", node, extra=extra)
    if getattr(metric, "reference_name", None) == "reference":
        metric.reference_name = f"{type(datamodule).__name__}-train"
    return metric


def _reference(metric: Any, datamodule: Any) -> Any:
    """The training split, capped at the metric's ``max_reference`` (default :data:`MAX_REFERENCE`)."""
    from diffusion_lab.callbacks.evaluation import MAX_REFERENCE

    cap = getattr(metric, "max_reference", MAX_REFERENCE)
    data = datamodule.train_tensor()
    return data if cap is None else data[:cap]


def _metric_protocol(metric: Any) -> dict[str, Any]:
    protocol = metric.protocol() if hasattr(metric, "protocol") else {}
    extractor = getattr(getattr(metric, "extractor", None), "extractor_id", None)
    return {"metric": type(metric).__name__, **({"feature_extractor": extractor} if extractor else {}), **protocol}


@dataclass
class SamplePlan:
    """Everything sample scoring needs, built and checked before any evaluation work: the run's datamodule
    (not set up), one metric per score (ready: e.g. the Inception weights loaded and checked) and the sampler."""

    datamodule: Any
    metrics: dict[str, Any]
    sampler: Any


# Sample-quality score -> (the data it scores, whether a checkpoint's ``data_shape`` is such data).
SCORE_DATA: dict[str, tuple[str, Callable[[tuple[int, ...]], bool]]] = {
    "fid": ("images (C, H, W) with C = 1 or 3", lambda s: len(s) == 3 and s[0] in (1, 3)),
    "fd_digits": ("grayscale digit images (1, H, W)", lambda s: len(s) == 3 and s[0] == 1),
    "toy2d": ("2-D points (2,)", lambda s: s == (2,)),
}


def check_score_data(scores: list[str], data_shape: tuple[int, ...]) -> None:
    """Every sample score must suit the checkpoint's data (``fd_digits`` on 2-D points cannot produce a number);
    raise :class:`ConfigError` naming ``scores`` and the scores valid for this data."""
    shape = tuple(data_shape)
    bad = [s for s in scores if s in SCORE_DATA and not SCORE_DATA[s][1](shape)]
    if bad:
        valid = [s for s, (_, fits) in SCORE_DATA.items() if fits(shape)] + list(EVALUATORS)
        needs = "; ".join(f"{s} needs {SCORE_DATA[s][0]}" for s in bad)
        raise ConfigError(
            f"scores={bad} cannot score this checkpoint's data of shape {shape} ({needs}); "
            f"valid choices for this checkpoint: {valid}"
        )


def sample_scores_of(scores: list[str], data_shape: tuple[int, ...]) -> list[str]:
    """The sample scores to compute for ``scores``: those requested; when only precision / recall / density /
    coverage are, the one whose features they use for this data (2-D points: toy2d; one channel: fd_digits; else fid).
    With several, precision … coverage are computed in the features of the first."""
    requested = [s for s in scores if s in SAMPLE_SCORES]
    if requested or not any(s in PRDC_SCORES for s in scores):
        return requested
    shape = tuple(data_shape)
    return ["toy2d" if shape == (2,) else "fd_digits" if shape[:1] == (1,) else "fid"]


def plan_samples(cfg: DictConfig, module: DiffusionModule, scores: list[str], overrides: list[str]) -> SamplePlan:
    """Build and check the metrics and sampler of the sample ``scores`` (data shape, Inception weights, guidance,
    sampler vs schedule): an impossible request fails here, before any likelihood evaluation or sampling."""
    assert module.config is not None
    check_score_data(scores, module.data_shape)
    check_prdc_scores(list(cfg.scores), scores[0])
    datamodule = build_option("dataset", module.config["dataset"])
    metrics = {s: sample_metric(cfg, module, s, datamodule) for s in scores}
    for metric in metrics.values():  # e.g. load and check the Inception weights
        getattr(metric, "check_ready", lambda: None)()
    if str(getattr(cfg.guidance, "value", cfg.guidance)) == "cfg":  # autoguidance needs no null label
        check_guidance("guidance_scale", cfg.guidance_scale, module.num_classes, module.p_uncond)
    from diffusion_lab.autoguidance import check_guide
    from diffusion_lab.checkpoint_jobs import build_sampler

    if cfg.guide_ckpt:
        check_guide(cfg.ckpt_path, cfg.guide_ckpt)  # the guide's config against the model's, before sampling

    return SamplePlan(datamodule, metrics, build_sampler(cfg, module, overrides))


def evaluate_samples(cfg: DictConfig, module: DiffusionModule, plan: SamplePlan) -> dict[str, Any]:
    """Draw ``cfg.num_samples`` samples once and score them with every metric of ``plan``
    (``val/<name>@N_nfeK``)."""
    from diffusion_lab.autoguidance import job_guidance
    from diffusion_lab.callbacks.evaluation import generate_in_batches, generation_suffix, sampling_protocol
    from diffusion_lab.metrics.base import metric_key
    from diffusion_lab.samplers.tuning import grid_protocol

    datamodule, sampler = plan.datamodule, plan.sampler
    out, rate = generate_in_batches(
        module, cfg.num_samples, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, progress=True,
        guidance=job_guidance(cfg, module),
    )  # fmt: skip
    suffix = generation_suffix(out)
    results: dict[str, Any] = {f"val/samples_per_s_nfe{out.nfe}{suffix}": rate}
    protocol: dict[str, Any] = {
        "samples": {
            **sampling_protocol(out, module.num_classes),
            "sampler": sampler.name, "steps": sampler.steps, **grid_protocol(sampler), "num_samples": cfg.num_samples,
            "seed": cfg.seed, "weights": "EMA" if cfg.use_ema else "raw",
            "reference": f"{type(datamodule).__name__} train split",
        },
    }  # fmt: skip
    for score, metric in plan.metrics.items():
        reference = _reference(metric, datamodule)
        raw = metric.compute(out.x0, reference)
        results |= {metric_key("val", k, cfg.num_samples, out.nfe, suffix): float(v) for k, v in raw.items()}
        protocol[score] = {**_metric_protocol(metric), "reference_examples": len(reference)}
    return {**results, "protocol": protocol}


def reference_stats_only(cfg: DictConfig, module: DiffusionModule) -> dict[str, Any]:
    """``ref_stats_only=true``: compute and cache every ``fid`` reference (and ``fid_floor@num_samples``)."""
    assert module.config is not None
    check_score_data(["fid"], module.data_shape)
    datamodule = build_option("dataset", module.config["dataset"])
    metric = sample_metric(cfg, module, "fid", datamodule)
    metric.check_ready()
    reference = _reference(metric, datamodule)
    info = metric.prepare_reference(reference, cfg.num_samples)
    floors = {f"val/{k}": v for k, v in info.items() if "@" in k}
    cache = {k: v for k, v in info.items() if "@" not in k}
    return {**floors, "protocol": {"fid": {**_metric_protocol(metric), **cache, "reference_examples": len(reference)}}}


def run(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every metric in ``cfg.scores`` on ``cfg.ckpt_path``; writes ``evaluation.json``.

    ``overrides``: the command line's (a chosen sampler keeps the run's ``clip_x0`` unless it is overridden). The
    config is checked first (:func:`~diffusion_lab.cli.validate_evaluate`: ranges, scores, the device), before torch
    is imported or the checkpoint read.
    """
    validate_evaluate(cfg)
    from diffusion_lab.tracking.filing import SUMMARY_FILE  # the tracking package imports Lightning

    records = (EVALUATION_FILE, SUMMARY_FILE)  # what an evaluate job leaves; a re-run removes them first
    with run_lock(out_dir, "dlab-evaluate"):  # a second job into out_dir is refused at once
        prepare_output_dir(out_dir, records)  # writable, and no old record beside new results
        return evaluate_checkpoint(cfg, out_dir, overrides)


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the checkpoint, compute every score and write ``evaluation.json`` (atomically) into ``out_dir`` (held
    and prepared by :func:`run`); returns the results."""
    from diffusion_lab.checkpoint_loading import load_module

    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    likelihoods = [name for name in cfg.scores if name in EVALUATORS]
    if likelihoods and not module.prior.gaussian:  # before any work: the model's source is not N(0, I)
        raise ConfigError(f"scores={likelihoods}: {cfg.ckpt_path} has a non-Gaussian prior, and {LIKELIHOOD_REASON}")
    results: dict[str, Any] = {"checkpoint": str(cfg.ckpt_path), "protocol": {}}
    if cfg.ref_stats_only:
        outputs = [reference_stats_only(cfg, module)]
    else:
        sample_scores = sample_scores_of(list(cfg.scores), module.data_shape)
        plan = plan_samples(cfg, module, sample_scores, overrides or []) if sample_scores else None
        outputs = [EVALUATORS[name](cfg, module) for name in cfg.scores if name in EVALUATORS]
        if plan is not None:
            outputs.append(evaluate_samples(cfg, module, plan))
    for out in outputs:
        results["protocol"].update(out.pop("protocol"))
        results.update(out)
    atomic_write_json(out_dir / EVALUATION_FILE, results)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The numeric results as a two-column Markdown table."""
    rows = [(k, v) for k, v in sorted(results.items()) if isinstance(v, float | int)]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"| {'metric':<{width}} | value    |", f"|{'-' * (width + 2)}|----------|"]
    lines += [f"| {k:<{width}} | {v:8.4f} |" for k, v in rows]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """``dlab-evaluate``: evaluation.json and summary.json in the output directory (:func:`run` checks the config
    before torch is imported)."""
    out_dir = output_dir(cfg)
    with run_lock(out_dir, "dlab-evaluate"):  # one lock from the scores to their record: no job can slip between
        results = run(cfg, out_dir, list(HydraConfig.get().overrides.task))
        from diffusion_lab.checkpoint_jobs import track

        track(cfg, out_dir, "eval", results)
    print(format_table(results))
    print(f"wrote {out_dir / EVALUATION_FILE} and {out_dir / 'summary.json'}")


if __name__ == "__main__":  # python -m diffusion_lab.evaluate …: the same entry point as dlab-evaluate
    main()
