"""How much the quality figure moves by chance: the Frechet distance of one model under two seed sets.

    python -m distill_forget.quality_noise --model FOLDER [--base FOLDER] [--forgotten a b ...]
                                          [--seeds 0 1 2] [--other-seeds 3 4 5]

The loop's quality figure is the Frechet distance, in the judge's feature space, between the
generated images of the retained (object, style) pairs and real renders of those pairs
(`evaluate.retained_quality`), compared with the base model's over the same pairs. This
prints, over the pairs that name no `--forgotten` concept: the base model's and the model's
distance with the evaluation seeds and with other seeds (the spread that comes from sampling
alone), two sets of real renders against each other, and the base against
itself under the two seed sets next to the model against the base. Sampling settings are
`configs/evaluate.yaml`'s.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.config import MINICANVAS_DIR, load_config
from distill_forget.evaluate import (
    frechet_distance,
    generate,
    grid_prompts,
    load_judge,
    real_renders,
    retained_pairs,
    retained_rows,
)
from distill_forget.pipelines import load_pipeline


def quality_noise(model_dir, base_dir, forgotten, seeds, other_seeds, cfg, judge) -> dict[str, float]:
    items, other = grid_prompts(seeds), grid_prompts(other_seeds)
    keep = retained_rows(items, forgotten)  # the grid's order is the same under any seeds

    def images(folder) -> tuple[torch.Tensor, torch.Tensor]:
        """The retained pairs' images under the evaluation seeds and under the other seeds."""
        pipe = load_pipeline(folder)
        return tuple(generate(pipe, [prompts[i] for i in keep], cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
                     for prompts in (items, other))  # fmt: skip

    (base, base_other), (model, model_other) = images(base_dir), images(model_dir)
    pairs = retained_pairs(forgotten, cfg.reference_repeats)
    real, real_other = real_renders(pairs, cfg.reference_seed), real_renders(pairs, cfg.reference_seed + 1)
    return {
        "base, evaluation seeds": frechet_distance(judge, base, real),
        "base, other seeds": frechet_distance(judge, base_other, real),
        "model, evaluation seeds": frechet_distance(judge, model, real),
        "model, other seeds": frechet_distance(judge, model_other, real),
        "real renders vs real renders (another seed)": frechet_distance(judge, real_other, real),
        "base vs base, the two seed sets": frechet_distance(judge, base, base_other),
        "model vs base, evaluation seeds": frechet_distance(judge, model, base),
        "images per side": len(keep),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the pipeline folder to check (a step's pipeline/)")
    parser.add_argument("--base", type=Path, default=MINICANVAS_DIR / "pipeline", help="default: the shipped model")
    parser.add_argument("--forgotten", nargs="*", default=[], help="concepts whose pairs are left out, as the loop does")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: configs/evaluate.yaml's seeds")
    parser.add_argument("--other-seeds", nargs="+", type=int, default=[3, 4, 5])
    parser.add_argument("--judge", default=None, help="default: the shipped MiniCanvas judge")
    args = parser.parse_args(argv)
    cfg = load_config("evaluate", [])
    seeds = args.seeds if args.seeds is not None else list(cfg.seeds)
    result = quality_noise(args.model, args.base, args.forgotten, seeds, args.other_seeds, cfg, load_judge(args.judge).eval())
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value if isinstance(value, int) else round(value, 1)}")


if __name__ == "__main__":
    main()
