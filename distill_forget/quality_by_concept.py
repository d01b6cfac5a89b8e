"""Where a model's quality rise comes from: the quality figure with one concept's images put back.

    python -m distill_forget.quality_by_concept --model FOLDER [--base FOLDER | --base-images RUN/base/images.pt]
                                               [--forgotten a b ...] [--seeds 12 [--base-cache FILE]]

The loop's quality figure is the Frechet distance, in the judge's feature space, between the
images of the retained (object, style) pairs and real renders of those pairs
(`evaluate.retained_quality`). Images with the same prompt and seed are comparable one to one
between two models, so for every retained concept this prints how much the figure falls when
that concept's images are the base model's again (the rest staying the model's), and how far
its images moved, as the mean absolute pixel change (0-255) from the base model's, and the
part of that change common to the whole image: the mean change of each colour channel (signed,
0-255). A concept whose images carry the rise tops the list; a rise spread over every concept
gives small drops all along; a colour cast shows as the same signed shift in every row. How
much of the rise the cast itself makes is the figure again with the mean colour change of all
images taken out of each model image (`without the cast`). The figure is also split into its two
terms, for the model and for the base model: `mean`, how far the images' features sit from the
renders' on average, and `spread`, how differently they spread; with the spread itself (the
trace of the features' covariance: the images' variety in the judge's eyes), so a rise made by
images that all moved one way shows apart from one made by images that became alike. Last, the
sharpness and contrast of the model's, the base model's and the renders' images.
Sampling settings are `configs/evaluate.yaml`'s. `--base-images` takes the base model's grid
that a run of the loop kept (`RUN/base/images.pt`) instead of drawing it again, refused where the
run's `config.yaml` records other evaluation seeds, sentences (`evaluate.templates`) or sampler
settings.

The loop's figure comes from the evaluation's few seeds and moves by tens of points with them
(`quality_noise`). `--seeds N` reads the figure over N seeds instead (the evaluation's first, then
the next integers; a multiple of the evaluation's count), against as many more real renders: the
figure `quality_noise` gives for the group of all N seeds, taken apart by concept. `--base-cache
FILE` reads the base model's images from, and keeps them in, `quality_noise`'s file of them.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.bars_noise import SAMPLED_WITH, run_config
from distill_forget.config import MINICANVAS_DIR, load_config
from distill_forget.evaluate import (
    frechet_distance_to,
    generate,
    grid_prompts,
    load_judge,
    retained_rows,
)
from distill_forget.metrics import quality_rise
from distill_forget.pipelines import load_pipeline
from distill_forget.quality_noise import base_images, group_renders, study_seeds
from distill_forget.storage import torch_load
from distill_forget.world.judge import JudgeFeatures


@torch.no_grad()
def quality_by_concept(
    model: torch.Tensor, base: torch.Tensor, prompts: list[dict], reference: torch.Tensor, judge
) -> dict:
    """The quality figure of `model` and `base` (uint8 images, row for row the same prompt and
    seed) against `reference`, and per concept of `prompts`: the figure with that concept's
    images taken from `base`, its drop from the model's, the mean pixel change of its images and
    their mean change per colour channel (`colour_shift`, R G B); `colour_shift` over all images too,
    the figure without it (`without_cast`), the figure's two terms for both (`terms`) and the
    sharpness and contrast of both and of the reference (`detail`).
    """
    distance = frechet_distance_to(judge, reference)  # the reference's features once, not once per concept
    if distance is None:
        raise ValueError(
            "quality_by_concept needs a judge with a feature space (`features`), as the quality figure does"
        )
    figure = distance(model)
    features = JudgeFeatures(judge)
    renders = features(reference)
    rows = []
    for concept in sorted({p[domain] for p in prompts for domain in ("object", "style")}):
        mine = torch.tensor([concept in (p["object"], p["style"]) for p in prompts])
        put_back = torch.where(mine[:, None, None, None], base, model)
        restored = distance(put_back)
        change = model[mine].float() - base[mine].float()
        rows.append({"concept": concept, "drop": figure - restored, "pixel_change": change.abs().mean().item(),
                     "colour_shift": colour_shift(change), "images": int(mine.sum())})  # fmt: skip
    rows.sort(key=lambda row: row["drop"], reverse=True)
    whole = colour_shift(model.float() - base.float())
    uncast = (model.float() - torch.tensor(whole)[None, :, None, None]).round().clamp(0, 255).to(torch.uint8)
    return {
        "model": figure, "base": distance(base), "colour_shift": whole, "without_cast": distance(uncast),
        "concepts": rows, "terms": {"model": frechet_terms(features(model), renders),
                                    "base": frechet_terms(features(base), renders)},
        "detail": {"model": detail(model), "base": detail(base), "renders": detail(reference)},
    }  # fmt: skip


def detail(images: torch.Tensor) -> dict:
    """How sharp and how contrasted uint8 images (N, C, H, W) are, on the 0-255 scale: `sharpness`,
    the mean absolute 4-neighbour Laplacian (fine detail and edges); `contrast`, the mean over
    images and channels of the pixels' standard deviation."""
    x = images.float()
    centre = x[..., 1:-1, 1:-1]
    around = x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:]
    return {"sharpness": float((4 * centre - around).abs().mean()), "contrast": float(x.std((2, 3)).mean())}


def frechet_terms(features: torch.Tensor, reference: torch.Tensor) -> dict:
    """The Frechet distance between two sets of feature vectors (N, D), as its two terms (they add
    up to it; in the judge's feature space, to the quality figure): `mean`, ||m - m_ref||^2, how
    far the features sit from the reference's on average; `spread`, Tr(S + S_ref - 2 (S S_ref)^1/2),
    how differently they spread; and `trace`, Tr(S), their own spread, and `reference_trace`."""
    mine, theirs = features.double(), reference.double()
    cov, cov_ref = torch.cov(mine.T), torch.cov(theirs.T)
    root_trace = torch.linalg.eigvals(cov @ cov_ref).sqrt().real.sum()  # Tr (S S_ref)^1/2, as torchmetrics takes it
    return {
        "mean": float((mine.mean(0) - theirs.mean(0)).square().sum()),
        "spread": float(cov.trace() + cov_ref.trace() - 2 * root_trace),
        "trace": float(cov.trace()), "reference_trace": float(cov_ref.trace()),
    }  # fmt: skip


def colour_shift(change: torch.Tensor) -> list[float]:
    """The mean of each colour channel of pixel changes (N, C, H, W): [R, G, B], signed."""
    return [round(v, 2) for v in change.mean((0, 2, 3)).tolist()]


def refuse_other_sampling(images_file: Path, cfg) -> None:
    """Refuse a run's kept base grid (RUN/base/images.pt) drawn with other evaluation seeds, sentences or sampler
    settings than `cfg`'s, as the run's `config.yaml` records them; a file outside a run folder is taken as it is."""
    run = images_file.parent.parent
    saved = run / "config.yaml"
    if not saved.is_file():
        print(f"{images_file} has no run config.yaml two folders up: its sampler settings are not checked")
        return
    try:
        drawn = run_config(run).evaluate
    except Exception as error:  # a YAML or OmegaConf error, or a top level that is no mapping
        raise SystemExit(f"{saved} cannot be read as a run's config ({error}); pass --base FOLDER") from None
    # a run from before `evaluate.templates` reads its default, [] (the evaluation's sentence alone)
    keys = ("seeds", "templates", *SAMPLED_WITH)
    differ = [f"{key} {drawn[key]} (here {cfg[key]})" for key in keys if drawn[key] != cfg[key]]
    if differ:
        raise SystemExit(f"{images_file} was drawn with other evaluation settings ({saved}): "
                         f"{', '.join(differ)}; pass --base FOLDER instead")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the pipeline folder to check (a step's pipeline/)")
    parser.add_argument("--base", type=Path, default=MINICANVAS_DIR / "pipeline", help="default: the shipped model")
    parser.add_argument(
        "--base-images",
        type=Path,
        default=None,
        help="RUN/base/images.pt: the base model's grid a run kept (evaluation seeds), instead of --base",
    )
    parser.add_argument(
        "--forgotten", nargs="*", default=[], help="concepts whose pairs are left out, as the loop does"
    )
    parser.add_argument("--judge", default=None, help="default: the shipped MiniCanvas judge")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds in all, a multiple of the evaluation's (default: the evaluation's own)")
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="quality_noise's file of the base model's images (drawn again where they differ)")
    args = parser.parse_args(argv)
    cfg = load_config("evaluate", [])
    torch.set_num_threads(cfg.threads)
    try:
        seeds = study_seeds(cfg.seeds, len(cfg.seeds) if args.seeds is None else args.seeds)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.base_images is not None and (args.seeds is not None or args.base_cache is not None):
        raise SystemExit("--base-images is the loop's grid of the evaluation seeds: leave out --seeds and --base-cache")
    items = grid_prompts(seeds)
    keep = retained_rows(items, args.forgotten)
    prompts = [items[i] for i in keep]
    if not prompts:
        raise SystemExit("no retained (object, style) pair is left: every pair names a --forgotten concept")
    images, folders = {}, {"base": args.base, "model": args.model}
    if args.base_images is not None:
        refuse_other_sampling(args.base_images, cfg)
        grid = torch_load(args.base_images, "base model images")
        if len(grid) != len(items):
            raise SystemExit(
                f"{args.base_images} holds {len(grid)} images, not the {len(items)} of the evaluation grid "
                "(configs/evaluate.yaml's seeds): pass --base FOLDER instead"
            )
        images["base"] = grid[keep]
        del folders["base"]
    elif args.base_cache is not None:
        images["base"] = base_images(args.base, items, cfg, args.base_cache)[keep]
        del folders["base"]
    for name, folder in folders.items():
        print(f"generating the {len(prompts)} retained images of {folder} ...", flush=True)
        images[name] = generate(load_pipeline(folder), prompts, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
    reference = group_renders(args.forgotten, len(seeds), len(cfg.seeds), cfg)  # quality_noise's group of all seeds
    result = quality_by_concept(images["model"], images["base"], prompts, reference, load_judge(args.judge).eval())
    rise = quality_rise(result["model"], result["base"])
    print(f"quality: model {result['model']:.1f}, base {result['base']:.1f} ({rise:+.1f} %)")
    shift = " ".join(f"{v:+.1f}" for v in result["colour_shift"])
    print(f"mean colour change of every retained image (R G B, 0-255): {shift}")
    uncast = result["without_cast"]
    print(f"quality without the cast (that change taken out of every model image): "
          f"{uncast:.1f} ({quality_rise(uncast, result['base']):+.1f} %)")  # fmt: skip
    print(
        "the figure's two terms, mean + spread, and the features' spread Tr S "
        f"(real renders: {result['terms']['base']['reference_trace']:.0f}):"
    )
    for name, terms in result["terms"].items():
        print(f"  {name:<5} {terms['mean']:7.1f} + {terms['spread']:7.1f}   Tr S {terms['trace']:7.0f}")
    print("sharpness (mean |Laplacian|) and contrast (pixel standard deviation), 0-255:")
    for name, measured in result["detail"].items():
        print(f"  {name:<7} {measured['sharpness']:5.1f}  {measured['contrast']:5.1f}")
    print(f"{'concept':<18} {'drop when put back':>18} {'pixel change':>12} {'colour change R G B':>21} {'images':>6}")
    for row in result["concepts"]:
        shift = " ".join(f"{v:+6.1f}" for v in row["colour_shift"])
        print(f"{row['concept']:<18} {row['drop']:>18.1f} {row['pixel_change']:>12.1f} {shift:>21} {row['images']:>6}")


if __name__ == "__main__":
    main()
