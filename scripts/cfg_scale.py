"""Classifier-free guidance scale vs sample quality and label agreement on a class-conditional checkpoint.

    uv run python scripts/cfg_scale.py outputs/digits_cfg/<run>/checkpoints/last.ckpt --scales 0 1 2 4 \
        --num-samples 1000 --sampler dpm_solver --steps 20

For each guidance scale ``w`` it draws ``num_samples`` EMA samples (labels cycling over the 10 digits, the same
noise for every ``w``), and prints a Markdown table of: the Fréchet digits distance to the training split, and
the *label agreement*: the fraction of samples that the project's digits classifier assigns to the label they
were drawn for (``w = 0`` is the unconditional model, so chance level, 0.1, is expected there). Writes the table
and the protocol as JSON next to the checkpoint's run (``--out``). Needs a digits run (``experiment=digits_cfg``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.callbacks import generate_in_batches
from diffusion_lab.checkpoint_loading import load_module
from diffusion_lab.metrics.digits import DigitsFrechetDistance
from diffusion_lab.schema.registry import build_option, option_config, option_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--sampler", default="dpm_solver", help="a conf/sampler option")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: <run>/cfg_scale.json)")
    args = parser.parse_args(argv)

    module = load_module(args.ckpt)
    if module.num_classes is None:
        raise SystemExit(f"{args.ckpt} is an unconditional model; train one with experiment=digits_cfg")
    assert module.config is not None
    if args.sampler not in option_names("sampler"):
        raise SystemExit(f"unknown --sampler {args.sampler!r}; valid choices: {sorted(option_names('sampler'))}")
    schema = option_config("sampler", args.sampler)
    sampler = build_option("sampler", OmegaConf.merge(schema, {"steps": args.steps, "clip_x0": 1.0}))
    dataset = build_option("dataset", module.config["dataset"])
    dataset.setup("fit")
    metric = DigitsFrechetDistance(resize=module.config["metrics"]["resize"])
    ref = metric.reference_stats(dataset.train_tensor())

    rows = []
    for w in args.scales:
        out, rate = generate_in_batches(module, args.num_samples, args.batch_size, args.seed, sampler, guidance_scale=w)
        scores = metric.compute_from_stats(out.x0, *ref)
        assert out.y is not None
        agreement = float((metric.predict(out.x0) == out.y).double().mean())
        rows.append({"guidance_scale": w, "fd_digits": scores["fd_digits"], "label_agreement": agreement,
                     "class_entropy": scores["class_entropy"], "nfe": out.nfe,
                     "network_evals": out.network_evals, "samples_per_s": rate})  # fmt: skip

    print(f"| w | fd_digits@{args.num_samples} | label agreement | class entropy |")
    print("|---|---|---|---|")
    for r in rows:
        cells = f"{r['fd_digits']:.3f} | {r['label_agreement']:.3f} | {r['class_entropy']:.3f}"
        print(f"| {r['guidance_scale']:g} | {cells} |")
    protocol = {"checkpoint": str(args.ckpt), "sampler": args.sampler, "steps": args.steps,
                "num_samples": args.num_samples, "seed": args.seed, "extractor": metric.extractor_id}  # fmt: skip
    out_path = args.out or args.ckpt.parent.parent / "cfg_scale.json"
    out_path.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
