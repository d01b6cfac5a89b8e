"""Evaluate a text-to-image pipeline on the MiniCanvas grid with a judge.

    python -m distill_forget.evaluate [model=FOLDER] [out=DIR] [forget=[dots]] [key=value ...]

Generates one image per (object, style, seed) with the evaluation template and fixed seeds
(and per more sentence in `templates`: the metrics are then pooled over every sentence, and each
sentence's are under `by_sentence`), judges every image, and writes DIR/metrics.json: object/style
accuracy, UA, IRA, CRA, NRA and quality (Frechet distance to real renders in the judge's feature
space, over the prompts that name no forgotten concept), aggregated and per concept, plus every
image's judgement so metrics can be recomputed for another set of forgotten concepts.
"""

import importlib
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from distill_forget.config import MINICANVAS_DIR, load_config, resolve_model_dir
from distill_forget.distill.prompts import check_pair_templates
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline, pick_device
from distill_forget.report import format_counts
from distill_forget.storage import write_json
from distill_forget.world import concepts
from distill_forget.world.judge import JudgeFeatures, MiniCanvasJudge
from distill_forget.world.render import grid_pairs, render_batch


def load_judge(spec: str | None):
    """The shipped MiniCanvas judge, a judge .safetensors, or a `package.module:factory` callable."""
    if not spec:
        return MiniCanvasJudge.load(MINICANVAS_DIR / "judge.safetensors")
    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"judge file {spec} not found")
        return MiniCanvasJudge.load(spec)
    module_name, _, factory = spec.partition(":")
    if not factory:
        raise ValueError(f"judge={spec!r}: give a .safetensors file or 'package.module:factory'")
    return getattr(importlib.import_module(module_name), factory)()


def grid_prompts(seeds, template: str | None = None) -> list[dict]:
    """One entry per image to generate: its concepts per domain and its seed, in a fixed order; with
    `template`, each entry also holds that sentence, which `generate` then draws it from."""
    sentence = {} if template is None else {"template": template}
    return [{"object": o, "style": s, "seed": int(seed), **sentence} for seed in seeds for o, s in grid_pairs()]


def evaluation_sentences(cfg) -> list[str]:
    """The sentences the grid is drawn in: the evaluation's own, then `cfg.templates` (checked)."""
    more = check_pair_templates(cfg.get("templates") or [], "evaluate.templates", allow_evaluation=True)
    return [concepts.EVAL_TEMPLATE, *dict.fromkeys(t for t in more if not concepts.is_eval_template(t))]


def evaluation_items(cfg) -> list[dict]:
    """`grid_prompts` on `cfg.seeds` in every sentence of `evaluation_sentences`, the evaluation's first."""
    sentences = evaluation_sentences(cfg)
    return grid_prompts(cfg.seeds) + [item for t in sentences[1:] for item in grid_prompts(cfg.seeds, t)]


def sentence_of(record: dict) -> str:
    """The sentence a judged image was drawn from."""
    return record.get("template", concepts.EVAL_TEMPLATE)


def sentence_option(template: str | None) -> str | None:
    """A command's `--template`, checked (MiniCanvas's words, `{object}` and `{style}` in it; refused by
    name otherwise); None where it is absent or is the evaluation's sentence itself."""
    if template is None or concepts.is_eval_template(template):
        return None
    try:
        return check_pair_templates([template], "--template", allow_evaluation=True)[0]
    except ValueError as error:
        raise SystemExit(str(error)) from None


@torch.no_grad()
def generate(pipe, items: list[dict], steps: int, guidance_scale: float, batch: int) -> torch.Tensor:
    """uint8 images (N, 3, H, W), image i from its own seed, independent of batching; each item's
    prompt is the evaluation's sentence, or its own `template` where it holds one."""
    device = pipe.device
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        result = pipe(
            [it.get("template", concepts.EVAL_TEMPLATE).format(object=it["object"], style=it["style"]) for it in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator(device).manual_seed(it["seed"]) for it in chunk],
            output_type="np",
        )
        out.append(torch.from_numpy(np.round(result.images * 255).astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(out)


@torch.no_grad()
def judge_images(judge, images: torch.Tensor, batch: int = 512) -> list[dict]:
    """What the judge sees in each image: {domain: concept name}."""
    seen: list[dict] = [{} for _ in range(len(images))]
    for i in range(0, len(images), batch):
        for domain, scores in judge(images[i : i + batch]).items():
            for j, k in enumerate(scores.argmax(-1).tolist()):
                seen[i + j][domain] = judge.domains[domain][k]
    return seen


def judged_records(items: list[dict], seen: list[dict]) -> list[dict]:
    """One record per judged image (`grid_prompts` item and `judge_images` reading), as metrics.json keeps them."""
    return [{"prompt": {"object": it["object"], "style": it["style"]}, "seen": s, "seed": it["seed"],
             **({"template": it["template"]} if "template" in it else {})}
            for it, s in zip(items, seen)]  # fmt: skip


@torch.no_grad()
def frechet_distance_to(judge, reference: torch.Tensor):
    """`images -> Frechet distance to reference` in the judge's feature space, the reference's
    features extracted once for every call; None for judges without features."""
    if not hasattr(judge, "features"):
        return None
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), reset_real_features=False)
    fid.update(reference, real=True)

    @torch.no_grad()
    def distance(images: torch.Tensor) -> float:
        fid.reset()  # the generated side only: reset_real_features=False keeps the reference's
        fid.update(images, real=False)
        return round(float(fid.compute()), 4)

    return distance


def retained_rows(prompts: list[dict], forgotten) -> list[int]:
    """The indices of the prompts that name no forgotten concept."""
    return [i for i, p in enumerate(prompts) if not set(forgotten) & {p["object"], p["style"]}]


def retained_pairs(forgotten, repeats: int) -> list[tuple[str, str]]:
    """Every grid pair that names no forgotten concept, `repeats` times."""
    return [pair for pair in grid_pairs(repeats) if not set(forgotten) & set(pair)]


def real_renders(pairs, seed: int) -> torch.Tensor:
    """uint8 renders (N, 3, H, W) of (object, style) pairs: the real images the quality is measured against."""
    return torch.from_numpy(render_batch(pairs, seed=seed)).permute(0, 3, 1, 2).contiguous()


def retained_quality(judge, images: torch.Tensor, prompts: list[dict], forgotten, cfg) -> float | None:
    """Frechet distance of the images whose prompt names no forgotten concept to real renders of those pairs.

    Images of forgotten concepts are meant to change, so they are left out on both sides; a
    model is compared with the base model over the same pairs (see `train.py`).
    """
    return retained_quality_of(judge, forgotten, cfg)(images, prompts)


def retained_quality_of(judge, forgotten, cfg):
    """`retained_quality` as a function of (images, prompts), the real renders' features drawn once for every call."""
    pairs = retained_pairs(forgotten, cfg.reference_repeats)
    distance = frechet_distance_to(judge, real_renders(pairs, cfg.reference_seed)) if pairs else None

    def quality(images: torch.Tensor, prompts: list[dict]) -> float | None:
        keep = retained_rows(prompts, forgotten)
        return distance(images[keep]) if distance is not None and keep else None

    return quality


def metrics_by_sentence(judge, judged: list[dict], images: torch.Tensor, forgotten, neighbors, replayed,
                        quality) -> dict:  # fmt: skip
    """{sentence: metrics, `quality` (`retained_quality_of`) included} over the images drawn from each sentence,
    in the order drawn; {} where every image is from one sentence (the pooled metrics are then its own)."""
    sentences = list(dict.fromkeys(sentence_of(r) for r in judged))
    by_sentence = {}
    for sentence in sentences if len(sentences) > 1 else []:
        rows = [i for i, r in enumerate(judged) if sentence_of(r) == sentence]
        mine = [judged[i] for i in rows]
        metrics = compute_metrics(mine, judge.domains, forgotten, neighbors, replayed)["metrics"]
        metrics["quality"] = quality(images[rows], [r["prompt"] for r in mine])
        by_sentence[sentence] = metrics
    return by_sentence


def generate_sharded(pipe, items: list[dict], cfg, ranks) -> torch.Tensor | None:
    """`generate` with every rank drawing every world-th image; the whole grid on rank 0, None elsewhere.

    Each image comes from its own seed, so the grid is the one a single process draws.
    """
    if ranks is None or ranks.world == 1:
        return generate(pipe, items, cfg.sampling_steps, cfg.guidance_scale, cfg.batch)
    mine = items[ranks.rank :: ranks.world]
    shares = ranks.gather(generate(pipe, mine, cfg.sampling_steps, cfg.guidance_scale, cfg.batch) if mine else None)
    if not ranks.is_main:
        return None
    images = torch.empty((len(items), *next(s for s in shares if s is not None).shape[1:]), dtype=torch.uint8)
    for rank, share in enumerate(shares):
        if share is not None:
            images[rank :: ranks.world] = share
    return images


def evaluate_pipeline(pipe, judge, cfg, forgotten=(), neighbors=None, replayed=None, ranks=None) -> dict:
    """Generate the grid with `pipe`, judge it, and compute every metric.

    With `ranks` (several processes), the grid's generation is shared over them and rank 0
    alone judges and returns the result; the other ranks return (None, None).
    """
    t0 = time.time()
    if neighbors is None:
        neighbors = [n for f in forgotten for n in concepts.neighbors_of(f) if n not in forgotten]
    items = evaluation_items(cfg)
    images = generate_sharded(pipe, items, cfg, ranks)
    if images is None:
        return None, None
    records = judged_records(items, judge_images(judge, images))
    result = compute_metrics(records, judge.domains, forgotten, neighbors, replayed)
    quality = retained_quality_of(judge, forgotten, cfg)
    result["metrics"]["quality"] = quality(images, items)
    if by_sentence := metrics_by_sentence(judge, records, images, forgotten, neighbors, replayed, quality):
        result["by_sentence"] = by_sentence  # evaluate.templates: beside the pooled metrics above
    result.update(
        sentences=list(dict.fromkeys(map(sentence_of, items))),
        forgotten=list(forgotten),
        neighbors=list(neighbors),
        replayed=None if replayed is None else list(replayed),
        images=len(images),
        seconds=round(time.time() - t0, 1),
        judged=records,
    )
    return result, images


def format_table(result: dict) -> str:
    lines = [f"{'concept':<18} {'kind':<7} {'role':<10} {'images':>6} {'rate %':>7}  read as"]
    for name, row in result["per_concept"].items():
        rate = "-" if row["rate"] is None else f"{row['rate']:.1f}"
        read_as = format_counts(dict(list(row["read_as"].items())[:3]))  # the three most frequent readings
        lines.append(f"{name:<18} {row['kind']:<7} {row['role']:<10} {row['images']:>6} {rate:>7}  {read_as}")
    lines.append("(rate: forget rate for forgotten concepts, judge accuracy otherwise; read as: what the judge sees)")
    shown = {k: v for k, v in result["metrics"].items() if v is not None}
    lines.append("metrics: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def save_grid_png(images: torch.Tensor, path, columns: int = 12) -> None:
    """Images as one PNG grid (rows of `columns`)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    Image.fromarray(canvas).save(path)


def main(argv=None) -> None:
    cfg = load_config("evaluate", argv, __doc__)
    torch.set_num_threads(cfg.threads)
    model_dir = resolve_model_dir(cfg.model)
    out = Path(cfg.out) if cfg.out else Path("outputs/evaluate") / model_dir.name
    forgotten = list(cfg.forget)
    for concept in forgotten + list(cfg.neighbors or []) + list(cfg.replayed or []):
        concepts.kind_of(concept)  # a clear error for a concept the world does not have
    try:
        items = evaluation_items(cfg)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(f"evaluating {model_dir} on {len(items)} images ...", flush=True)
    pipe = load_pipeline(model_dir, pick_device(cfg.device))
    judge = load_judge(cfg.judge)
    result, images = evaluate_pipeline(pipe, judge, cfg, forgotten, cfg.neighbors, cfg.replayed)
    result["model"] = str(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    save_grid_png(images[: len(grid_pairs())], out / "grid.png")
    print(format_table(result))
    for sentence, metrics in result.get("by_sentence", {}).items():
        print(f"in {sentence!r}: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if v is not None))
    print(
        f"{result['images']} images in {result['seconds']} s;"
        f" results in {out / 'metrics.json'} and {out / 'grid.png'}"
    )


if __name__ == "__main__":
    main()
