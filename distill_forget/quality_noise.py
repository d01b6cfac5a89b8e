"""How much the quality figure moves by chance, and how it settles as the sample grows.

    python -m distill_forget.quality_noise RUN/steps/03-stripes [RUN/steps/08-heart ...]
                                          [--base FOLDER] [--seeds 12] [--judge SPEC] [--base-cache FILE]
                                          [--template "a drawing of a {object} in {style} style"]

The loop's quality figure is the Frechet distance, in the judge's feature space, between the
images of the retained (object, style) pairs under the evaluation seeds and as many real
renders of those pairs (`evaluate.retained_quality`), compared with the base model's over the
same pairs. A Frechet distance from a few hundred images is biased upwards and moves with the
sample, so this draws every step's model and the base model under `--seeds` seeds (the
evaluation seeds first) and gives the figure over disjoint groups of seeds of each size: the
evaluation's own size (its first group is the loop's figure), twice it, and so on up to all of
them, each group against its own real renders. The spread of the rise within a size is the
figure's noise at that size; where the rise settles as the size grows is the model's. A step's
forgotten concepts (whose pairs are left out) come from its `metrics.json`. Sampling settings
are `configs/evaluate.yaml`'s.

The base model's images are most of the work when one or two steps are read. `--base-cache
FILE` keeps them in FILE: a later call with the same base weights (their content hash), prompts,
seeds and sampler settings reads them from there instead of drawing them again; where any of
those differs, or the file is unreadable, it draws them again and replaces the file (written whole
under a temporary name).

`--template` draws every image, the base model's too, from another sentence for the same pairs
(MiniCanvas's words, `{object}` and `{style}` in it): how the rise reads on a sentence other than
the evaluation's. That is not the loop's quality figure, whose bar reads the evaluation's sentence.
"""

import argparse
import json
from pathlib import Path

import torch

from distill_forget.config import MINICANVAS_DIR, load_config
from distill_forget.evaluate import (
    frechet_distance_to,
    generate,
    grid_prompts,
    load_judge,
    real_renders,
    retained_pairs,
    retained_rows,
    sentence_option,
)
from distill_forget.ledger import weights_hash
from distill_forget.metrics import quality_rise
from distill_forget.pipelines import load_pipeline
from distill_forget.storage import torch_load, torch_save


def study_seeds(evaluation_seeds, count: int) -> list[int]:
    """The evaluation seeds, then the next integers after them, `count` seeds in all."""
    seeds = [int(s) for s in evaluation_seeds]
    if count < len(seeds) or count % len(seeds):
        raise ValueError(f"--seeds {count}: give a multiple of the evaluation's {len(seeds)} seeds")
    return seeds + list(range(max(seeds) + 1, max(seeds) + 1 + count - len(seeds)))


def group_sizes(per_evaluation: int, count: int) -> list[int]:
    """The evaluation's seed count, doubled while it divides `count`, then `count` itself."""
    sizes, size = [], per_evaluation
    while size < count and count % size == 0:
        sizes.append(size)
        size *= 2
    return [*sizes, count]


def rise_by_sample_size(model, base, prompts, forgotten, seeds, per_evaluation, judge, cfg) -> list[dict]:
    """The quality figure of `model` and `base` (uint8 images of the retained `prompts`, row for row
    the same prompt and seed, over `seeds`) over disjoint seed groups of each size.

    Group k of size g reads the images of seeds[k g : (k + 1) g] and real renders of the retained
    pairs, `cfg.reference_repeats` per pair for every `per_evaluation` seeds, drawn with
    `cfg.reference_seed + k`: group 0 of the evaluation's size is the loop's own figure.
    """
    seed_of = torch.tensor([p["seed"] for p in prompts])
    rows = []
    for size in group_sizes(per_evaluation, len(seeds)):
        for k in range(len(seeds) // size):
            group = seeds[k * size : (k + 1) * size]
            mine = torch.isin(seed_of, torch.tensor(group))
            reference = group_renders(forgotten, size, per_evaluation, cfg, k)
            distance = frechet_distance_to(judge, reference)  # the reference's features once, for both models
            if distance is None:
                raise ValueError("quality_noise needs a judge with a feature space (`features`), as quality does")
            model_figure, base_figure = distance(model[mine]), distance(base[mine])
            rows.append({"size": size, "seeds": group, "images": int(mine.sum()), "base": base_figure,
                         "model": model_figure, "rise": quality_rise(model_figure, base_figure)})  # fmt: skip
    return rows


def group_renders(forgotten, size: int, per_evaluation: int, cfg, group: int = 0) -> torch.Tensor:
    """The real renders that group `group` of `size` seeds is judged against: `cfg.reference_repeats`
    per retained pair for every `per_evaluation` seeds, drawn with `cfg.reference_seed + group`."""
    repeats = cfg.reference_repeats * size // per_evaluation
    return real_renders(retained_pairs(forgotten, repeats), cfg.reference_seed + group)


def forgotten_of(step: Path) -> list[str]:
    """The concepts forgotten up to a step of the loop, from its `metrics.json`."""
    path = step / "metrics.json"
    if not path.is_file() or not (step / "pipeline").is_dir():
        raise SystemExit(f"{step} is not a step folder of a run (no metrics.json and pipeline/ in it)")
    return list(json.loads(path.read_text())["forgotten"])


def base_images(base: Path, items: list[dict], cfg, cache: Path | None) -> torch.Tensor:
    """The base model's images of `items`, from `cache` where it was drawn the same way, else drawn (and kept there)."""
    drawn_with = {"weights": weights_hash(base), "items": items, "sampling_steps": cfg.sampling_steps,
                  "guidance_scale": cfg.guidance_scale}  # fmt: skip
    if cache is not None and cache.is_file():
        try:
            kept = torch_load(cache, "base images file")
        except ValueError as error:
            kept = None
            print(f"{error}: drawing them again")
        if isinstance(kept, dict) and kept.get("drawn_with") == drawn_with:
            print(f"the base model's {len(items)} images read from {cache}", flush=True)
            return kept["images"]
        if kept is not None:
            print(f"{cache} holds images of other weights, prompts, seeds or sampler settings: drawing them again")
    print(f"generating the base model's {len(items)} images ...", flush=True)
    images = generate(load_pipeline(base), items, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
    if cache is not None:
        torch_save({"drawn_with": drawn_with, "images": images}, cache)
    return images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", type=Path, nargs="+", help="step folders of a run (RUN/steps/NN-concept)")
    parser.add_argument("--base", type=Path, default=MINICANVAS_DIR / "pipeline", help="default: the shipped model")
    parser.add_argument("--seeds", type=int, default=12, help="seeds in all, a multiple of the evaluation's")
    parser.add_argument("--judge", default=None, help="default: the shipped MiniCanvas judge")
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="a file keeping the base model's images between calls (drawn again where they differ)")
    parser.add_argument("--template", default=None,
                        help="draw the images from this sentence for the pairs (default: the evaluation's)")
    args = parser.parse_args(argv)
    template = sentence_option(args.template)
    cfg = load_config("evaluate", [])
    torch.set_num_threads(cfg.threads)
    try:
        seeds = study_seeds(cfg.seeds, args.seeds)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    forgotten = {step: forgotten_of(step) for step in args.steps}
    judge = load_judge(args.judge).eval()
    items = grid_prompts(seeds, template)
    if template is not None:
        print(f"every image from {template!r}, not the evaluation's sentence: not the loop's figure")
    base = base_images(args.base, items, cfg, args.base_cache)
    for step, concepts in forgotten.items():
        keep = retained_rows(items, concepts)
        prompts = [items[i] for i in keep]
        print(f"generating the {len(prompts)} retained images of {step} ...", flush=True)
        pipe = load_pipeline(step / "pipeline")
        model = generate(pipe, prompts, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
        rows = rise_by_sample_size(model, base[keep], prompts, concepts, seeds, len(cfg.seeds), judge, cfg)
        print(f"\n{step.name} (forgotten: {' '.join(concepts) or 'none'})")
        print(f"{'seeds':<10} {'images':>6} {'base':>7} {'model':>7} {'rise':>8}")
        for row in rows:
            label = f"{row['seeds'][0]}-{row['seeds'][-1]}"
            print(f"{label:<10} {row['images']:>6} {row['base']:>7.1f} {row['model']:>7.1f} {row['rise']:>+7.1f} %")
        for size in group_sizes(len(cfg.seeds), len(seeds)):
            rises = [row["rise"] for row in rows if row["size"] == size]
            groups = len(rises)
            spread = f"{min(rises):+.1f} to {max(rises):+.1f} % over {groups} groups, mean " if groups > 1 else ""
            print(f"{size} seeds: rise {spread}{sum(rises) / len(rises):+.1f} %")


if __name__ == "__main__":
    main()
