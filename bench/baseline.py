"""Side by side on the same model, in one run: the original's sampler (1000 ancestral DDPM steps) against our
default (DPM-Solver++ 20 steps), both through the worker's ``Engine`` in the worker's precision. Speed is measured
here; FID and attribute accuracy come from the evaluation tool's results stored in the checkpoint manifest
(``python -m training evaluate --settings ddpm:1000,dpmpp:20 ...``).

    python -m bench.baseline --batches 1,32
"""

from __future__ import annotations

import argparse

from bench.common import markdown_table, model_arguments, save
from bench.samplers import measure
from facegen.model.checkpoints import read_evaluation, resolve_version
from worker.engine import Engine

BASELINE = ("ddpm", 1000)
DEFAULT = ("dpmpp", 20)


def evaluation_of(checkpoints: str, version: str, guidance: float) -> dict[str, dict]:
    """``{"ddpm-1000": {...}, "dpmpp-20": {...}}`` from the version's evaluation record, where present."""
    settings = read_evaluation(resolve_version(checkpoints, "diffusion", version)).get("evaluation", {}).get("settings", [])
    wanted = {f"{s}-{n}-g{guidance:g}": f"{s}-{n}" for s, n in (BASELINE, DEFAULT)}
    return {wanted[entry["setting"]]: entry for entry in settings if entry.get("setting") in wanted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args(argv)

    engine = Engine(args.checkpoints, args.model, args.device, args.precision,
                    max_batch=max(int(b) for b in args.batches.split(",")))
    guidance = engine.model.sampling.guidance_scale
    speed = {}
    for batch in (int(b) for b in args.batches.split(",")):
        for sampler, steps in (DEFAULT, BASELINE):
            speed[(sampler, batch)] = measure(engine, batch, sampler, steps, guidance, repeat=3)
            print(f"{sampler} {steps} batch {batch}: {speed[(sampler, batch)]:.3f} images/s", flush=True)
    quality = evaluation_of(args.checkpoints, engine.version, guidance)

    rows = []
    for sampler, steps in (BASELINE, DEFAULT):
        entry = quality.get(f"{sampler}-{steps}", {})
        rows.append([f"{sampler} {steps}", *(speed[(sampler, int(b))] for b in args.batches.split(",")),
                     entry.get("fid", "not evaluated"), entry.get("accuracy_smiling", "-"),
                     entry.get("accuracy_not_smiling", "-")])
    batches = [int(b) for b in args.batches.split(",")]
    # the sampler alone (both at the same batch), then the sampler and batching together (our serving path at the
    # largest batch against the original's one request at a time): two different claims, never mixed
    ratios = {f"sampler_only_batch_{b}": speed[(DEFAULT[0], b)] / speed[(BASELINE[0], b)] for b in batches}
    serving = speed[(DEFAULT[0], max(batches))] / speed[(BASELINE[0], min(batches))]
    ratios[f"sampler_and_batching_{max(batches)}_vs_{min(batches)}"] = serving
    fid_ratio = (quality["dpmpp-20"]["fid"] / quality["ddpm-1000"]["fid"]) if len(quality) == 2 else None
    table = markdown_table(["sampler", *(f"images/s, batch {b}" for b in batches), "FID", "accuracy smiling",
                            "accuracy not smiling"], rows)
    table += "\n\n" + ", ".join(f"speed-up {k}: **{v:.1f}x**" for k, v in ratios.items())
    if fid_ratio is not None:
        table += f"; FID ratio (ours / DDPM 1000): **{fid_ratio:.3f}**"
    save("baseline", {"guidance": guidance, "images_per_s": {f"{s}@{b}": v for (s, b), v in speed.items()},
                      "speedups": ratios, "fid_ratio": fid_ratio, "evaluation": quality}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
