"""How much the bars' figures move by chance: a run's steps read again on more seeds.

    python -m distill_forget.bars_noise RUN [--seeds 12] [--steps 01-dots 05-neon ...] [--judge SPEC]
                                           [--base-from OTHER_RUN]
                                           [--template "a drawing of a {object} in {style} style"]

The loop reads UA, IRA, CRA and NRA from one image per (object, style, seed) under the evaluation
seeds: 36 images of each concept with three seeds. One student reads differently on other seeds,
so a figure near its bar holds or breaks partly by draw. This reads the base model and each step
of RUN under `--seeds` seeds in all: the evaluation's own (their judgements are reused from the
step's `metrics.json`), then the first integers after every seed the run used, the check's
included (the check chose the kept attempt on its seeds, so they would not be a fresh draw).
Before anything is drawn, the run's ledger is verified, and each step read must be one it
records: its weights those of the record (as when the loop goes on from a step), its `metrics.json`
the evaluation the record holds, and the starting model the weights the first request started from.
Every model's judgements are kept in RUN/bars_noise/<name>.json, written whole with the hash of
the weights they were drawn from, and a rerun reuses them (those of other weights, a step folder
replaced since, are drawn again); `--base-from OTHER_RUN` joins another run's kept judgements of the
same starting model (same weights, sampler settings and judge, else refused), so it is not drawn
again. For each step and bar it gives the figure over disjoint groups
of the evaluation's size (the first group is the loop's own reading; their spread is the noise of
one reading) and over all the seeds pooled (`--seeds` / 3 times the images, the steadier figure),
against the bars of `check.bars` in the run's config, and, pooled, how many images of each concept the judge reads
as it (which forgotten concepts are still drawn, which others are drawn less than by the base model). Results:
RUN/bars_noise/bars_noise.json and bars_noise.md.

`--template` draws every image, the base model's and the evaluation seeds' too, from another
sentence for the same pairs (MiniCanvas's words, `{object}` and `{style}` in it): whether a
concept stays forgotten, and the others kept, in a sentence other than the one the loop reads.
Its judgements and results live in a folder of their own, RUN/bars_noise/sentence-<words>/.

The quality figure's noise is `python -m distill_forget.quality_noise`'s.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill_forget.check import CHECKED, against_bars
from distill_forget.config import LOOP_SECTIONS, read_defaults, resolve_model_dir
from distill_forget.evaluate import (
    generate,
    grid_prompts,
    judge_images,
    judged_records,
    load_judge,
    sentence_of,
    sentence_option,
)
from distill_forget.ledger import LEDGER_NAME, Ledger, LedgerError, weights_hash
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline, pick_device
from distill_forget.storage import atomic_file, write_json
from distill_forget.world.concepts import EVAL_TEMPLATE


def study_seeds(run_cfg, count: int) -> list[int]:
    """The evaluation seeds, then the first integers after every seed the run used (evaluation and check)."""
    evaluation = [int(s) for s in run_cfg.evaluate.seeds]
    if count < len(evaluation) or count % len(evaluation):
        raise ValueError(f"--seeds {count}: give a multiple of the evaluation's {len(evaluation)} seeds")
    used = evaluation + [int(s) for s in run_cfg.check.seeds]
    start = max(used) + 1
    return evaluation + list(range(start, start + count - len(evaluation)))


def read_cache(path: Path, weights: str, say=print, template: str | None = None) -> list[dict]:
    """The judgements kept in `path`; none when they were drawn from other weights than `weights` or from another
    sentence than `template` (None: the evaluation's). A file from before the weights were recorded is taken as it
    is."""
    try:
        cached = json.loads(path.read_text())
        judged = cached["judged"]
    except (ValueError, KeyError) as error:
        raise SystemExit(f"{path} is not a judgement file of bars_noise ({error!r}); delete it to draw again") from None
    if cached.get("weights", weights) != weights:
        say(f"  {path}: drawn from other weights than the model's now (a folder replaced since, "
            "or a file copied from another run); drawing again", flush=True)  # fmt: skip
        return []
    if cached.get("template") != template:
        say(f"  {path}: drawn from the sentence {cached.get('template') or EVAL_TEMPLATE!r}, not "
            f"{template or EVAL_TEMPLATE!r}; drawing again", flush=True)  # fmt: skip
        return []
    return judged


# What makes a model's grid images the same in two runs, besides its weights and the seeds (`evaluate`'s settings),
# and with the judge, their judgements too
SAMPLED_WITH = ("sampling_steps", "guidance_scale")
DRAWN_WITH = (*(f"evaluate.{key}" for key in SAMPLED_WITH), "judge")
RESULTS = "bars_noise"  # RUN/bars_noise: the judgements kept and the results


def sentence_folder(template: str | None) -> str:
    """Where a reading in another sentence keeps its judgements and results, below RUN/bars_noise ("" for the
    evaluation's sentence): `sentence-` and the sentence's words, the slots as OBJECT and STYLE."""
    if template is None:
        return ""
    words = template.replace("{object}", " OBJECT ").replace("{style}", " STYLE ").replace(",", " comma ").split()
    return "sentence-" + "-".join(words)


def run_config(run: Path):
    """A run's saved config over today's defaults, the loop's sections too (a run from before a setting existed reads
    its default); a folder without one is refused by name."""
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run} is not a run folder of python -m distill_forget.train (no config.yaml)")
    return OmegaConf.merge(read_defaults("train", LOOP_SECTIONS), OmegaConf.load(run / "config.yaml"))


def take_base_from(other: Path, run_cfg, weights: str, cache: Path, say=print, template: str | None = None) -> None:
    """Another run's kept judgements of the starting model (`other`/bars_noise/base.json, or the sentence's folder
    there) joined to this run's (`cache`), so that they are not drawn again. Refused unless they were drawn from the
    same weights and sentence, with the same sampler settings and judge; seeds this run already holds keep this
    run's judgements."""
    source = other / RESULTS / sentence_folder(template) / "base.json"
    if not source.is_file():
        raise SystemExit(f"--base-from {other}: {source} is missing (read that run with bars_noise first)")
    other_cfg = run_config(other)
    for key in DRAWN_WITH:
        mine, theirs = OmegaConf.select(run_cfg, key), OmegaConf.select(other_cfg, key)
        if mine != theirs:
            raise SystemExit(f"--base-from {other}: its {key} is {theirs}, this run's {mine}: its images differ")
    taken = read_cache(source, weights, say=lambda *a, **k: None, template=template)
    if not taken:
        raise SystemExit(f"--base-from {other}: its starting model's judgements were drawn from other weights "
                         "or another sentence")  # fmt: skip
    held = read_cache(cache, weights, say, template) if cache.is_file() else []
    seeds = {r["seed"] for r in held}
    judged = held + [r for r in taken if r["seed"] not in seeds]
    write_json(cache, {"model": str(run_cfg.model), "weights": weights, "template": template, "judged": judged})
    added = len({r["seed"] for r in judged}) - len(seeds)
    say(f"  base: {added} seed(s) of judgements taken from {source}", flush=True)


def judged_on(
    pipeline_dir: Path,
    weights: str,
    reused: list[dict],
    seeds: list[int],
    cache: Path,
    judge,
    cfg,
    say=print,
    template: str | None = None,
) -> list[dict]:
    """The judge's reading of every grid image of `pipeline_dir` (whose weights hash `weights`) under `seeds`,
    one record per image, each drawn from `template` (None: the evaluation's sentence).

    Records of `reused` (the evaluation's) and of the cache (when drawn from these weights and sentence) are
    taken as they are; the other seeds' images are drawn and judged, and the cache is rewritten whole with them.
    """
    known: dict[int, list[dict]] = {}
    for record in reused + (read_cache(cache, weights, say, template) if cache.is_file() else []):
        known.setdefault(record["seed"], []).append(record)
    missing = [s for s in seeds if s not in known]
    if missing:
        say(f"  {cache.stem}: drawing seeds {missing[0]}-{missing[-1]} ...", flush=True)
        started = time.time()
        items = grid_prompts(missing, template)
        images = generate(
            load_pipeline(pipeline_dir, pick_device(cfg.device)),
            items,
            cfg.sampling_steps,
            cfg.guidance_scale,
            cfg.batch,
        )
        for record in judged_records(items, judge_images(judge, images)):
            known.setdefault(record["seed"], []).append(record)
        reused_seeds = {r["seed"] for r in reused}
        drawn = [r for s in sorted(known) if s not in reused_seeds for r in known[s]]
        write_json(cache, {"model": str(pipeline_dir), "weights": weights, "template": template, "judged": drawn})
        say(f"  {len(images)} images in {time.time() - started:.0f} s", flush=True)
    return [r for s in seeds for r in known[s]]


def metrics_on(judged, sets: dict, domains, seeds: list[int]) -> dict:
    """`compute_metrics` of the images of `seeds`, on the step's concept sets (forgotten, neighbours, replayed)."""
    mine = [r for r in judged if r["seed"] in seeds]
    return compute_metrics(mine, domains, sets["forgotten"], sets["neighbors"], sets["replayed"])


def readings(step_judged, base_judged, sets: dict, domains, seeds: list[int]) -> dict[str, float]:
    """The bars' figures (`against_bars`) of one step on the images of `seeds`, base on the same seeds."""

    def metrics_of(judged):
        metrics = metrics_on(judged, sets, domains, seeds)["metrics"]
        return {k: metrics[k] for k in CHECKED}

    return against_bars(metrics_of(step_judged), metrics_of(base_judged))


def step_noise(step_judged, base_judged, sets: dict, domains, seeds: list[int], group: int, bars) -> dict:
    """Per bar: the figure of each disjoint seed group of size `group`, all seeds pooled, and the groups under
    the bar."""
    groups = [seeds[k : k + group] for k in range(0, len(seeds), group)]
    per_group = [readings(step_judged, base_judged, sets, domains, g) for g in groups]
    pooled = readings(step_judged, base_judged, sets, domains, seeds)
    out = {}
    for name in pooled:
        values = [r[name] for r in per_group if name in r]
        bar = bars.get(name)
        out[name] = {"pooled": pooled[name], "groups": values, "bar": bar,
                     "groups_under": None if bar is None else sum(v < bar for v in values)}  # fmt: skip
    return out


def concept_counts(step_judged, base_judged, sets: dict, domains, seeds: list[int]) -> dict[str, dict]:
    """Per concept, all seeds pooled: its role, its images, and how many the judge reads as it, in the step's and
    in the base model's (`metrics.per_concept`, the images the bars count)."""
    step, base = (metrics_on(judged, sets, domains, seeds)["per_concept"] for judged in (step_judged, base_judged))
    return {c: {"role": row["role"], "images": row["images"], "drawn": row["read_as"].get(c, 0),
                "base_drawn": base[c]["read_as"].get(c, 0)} for c, row in step.items()}  # fmt: skip


def where_drawn(counts: dict[str, dict], most: int = 5) -> tuple[str, str]:
    """The forgotten concepts still drawn, and the other concepts drawn less than by the base model (the
    `most` largest losses, neighbours marked), as markdown cells: `name drawn/images` (base's count)."""
    forgotten = [(c, row) for c, row in counts.items() if row["role"] == "forgotten" and row["drawn"]]
    lost = [(c, row) for c, row in counts.items() if row["role"] != "forgotten" and row["drawn"] < row["base_drawn"]]
    forgotten.sort(key=lambda item: -item[1]["drawn"])
    lost.sort(key=lambda item: item[1]["drawn"] - item[1]["base_drawn"])
    still = ", ".join(f"{c} {row['drawn']}/{row['images']}" for c, row in forgotten) or "none"
    less = ", ".join(f"{c}{' (n)' if row['role'] == 'neighbor' else ''} {row['drawn']}/{row['images']} "
                     f"(base {row['base_drawn']})" for c, row in lost[:most])  # fmt: skip
    return still, less or "none"


def format_markdown(run: Path, seeds: list[int], group: int, rows: list[dict], template: str | None = None) -> str:
    first = "the loop's reading" if template is None else "the evaluation seeds' reading"
    sentence = [] if template is None else [f"Every image from {template!r}, the base model's too: not the sentence "
                                            "the loop reads.", ""]  # fmt: skip
    lines = [
        f"# How the bars' figures move by chance: {run}",
        "",
        (
            f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); groups of {group} (the first is {first}). "
            f"Each cell: all seeds pooled, {first}, [lowest - highest group], groups under the bar / groups. "
            "UA in %; IRA, CRA, NRA in % of the base model's on the same seeds."
        ),
        "",
        *sentence,
        "| request | concept | " + " | ".join(name.upper() for name in CHECKED) + " |",
        "|---" * (2 + len(CHECKED)) + "|",
    ]
    first_label = "loop" if template is None else f"seeds {seeds[0]}-{seeds[group - 1]}"
    for row in rows:
        cells = []
        for name in CHECKED:
            bar = row["bars"].get(name)
            if bar is None:
                cells.append("-")
                continue
            under = "" if bar["bar"] is None else f" {bar['groups_under']}/{len(bar['groups'])}"
            groups = bar["groups"]
            spread = f"[{min(groups):.1f} - {max(groups):.1f}]"
            cells.append(f"{bar['pooled']:.1f} ({first_label} {groups[0]:.1f}) {spread}{under}")
        lines.append(f"| {row['index']} | {row['concept']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Which concepts the images show, all seeds pooled",
        "",
        (
            "Images the judge reads as the concept, of the concept's images (a retained concept's leave out prompts "
            "naming a forgotten one, as the bars do); for the others, the base model's count on the same images. "
            "(n): a neighbour."
        ),
        "",
        "| request | concept | forgotten concepts still drawn | drawn less than by the base model (largest losses) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        still, less = where_drawn(row["concepts"])
        lines.append(f"| {row['index']} | {row['concept']} | {still} | {less} |")
    return "\n".join(lines) + "\n"


def run_steps(run: Path, names: list[str] | None) -> list[Path]:
    steps = sorted(p for p in (run / "steps").glob("*") if (p / "metrics.json").is_file() and (p / "pipeline").is_dir())
    if names:
        unknown = set(names) - {p.name for p in steps}
        if unknown:
            raise SystemExit(f"--steps {sorted(unknown)}: no evaluated step of that name in {run / 'steps'}")
        steps = [p for p in steps if p.name in names]
    if not steps:
        raise SystemExit(f"{run} has no evaluated step (steps/<i>-<concept>/ with metrics.json and pipeline/)")
    return steps


def step_request(step: Path) -> tuple[int, str]:
    """The request index and concept of a step folder `<i>-<concept>`."""
    index, _, concept = step.name.partition("-")
    return int(index), concept


def verified_weights(run: Path, model_dir: Path, evaluations: dict[Path, dict]) -> tuple[str, dict[Path, str]]:
    """The hashes of the starting model and of each step's weights, once each is shown to be what the run's
    ledger records: the model the first request started from, the weights and the evaluation (`evaluations`,
    each step's `metrics.json`) of the step's request."""
    ledger = Ledger(run / LEDGER_NAME)
    try:
        records = {record["index"]: record for record in ledger.verify()}
    except LedgerError as error:
        raise SystemExit(f"the run's ledger does not verify: {error}") from None
    hashes = {}
    for step, evaluation in evaluations.items():
        index, _ = step_request(step)
        if index not in records:
            raise SystemExit(f"{step}: the ledger has no record of request {index} (a step the loop did not finish)")
        try:
            hashes[step] = ledger.verify_weights(index, step / "pipeline")
        except LedgerError as error:
            raise SystemExit(f"refusing to read {step}: {error}") from None
        evaluated = {k: evaluation["metrics"].get(k) for k in CHECKED}
        recorded = {k: records[index]["metrics"].get(k) for k in CHECKED}
        if evaluated != recorded:
            raise SystemExit(f"{step / 'metrics.json'} is not the evaluation ledger record {index} holds ({evaluated} "
                             f"against {recorded}): the file was changed after the request")  # fmt: skip
    base = weights_hash(model_dir)
    if base != records[1]["input_hash"]:
        raise SystemExit(f"{model_dir}: its weights are not those the run's first request started from (hash "
                         f"{base[:16]}..., the ledger recorded {records[1]['input_hash'][:16]}...); "
                         "give the run's model")  # fmt: skip
    return base, hashes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of python -m distill_forget.train")
    parser.add_argument("--seeds", type=int, default=12, help="seeds in all, a multiple of the evaluation's")
    parser.add_argument("--steps", nargs="*", help="step folder names (default: every evaluated step)")
    parser.add_argument("--judge", default=None, help="default: the run's judge")
    parser.add_argument("--base-from", type=Path, default=None,
                        help="another run folder read by bars_noise, of the same starting model: its judgements of "
                             "that model are reused instead of drawn again")  # fmt: skip
    parser.add_argument("--template", default=None,
                        help="draw every image from this sentence for the pairs (default: the evaluation's)")
    args = parser.parse_args(argv)
    template = sentence_option(args.template)
    for needed in ("config.yaml", "base/metrics.json", LEDGER_NAME):
        if not (args.run / needed).is_file():
            raise SystemExit(f"{args.run} is not an evaluated run folder ({needed} is missing)")
    run_cfg = run_config(args.run)  # the check's seeds and bars: their defaults for a run from before them
    try:
        seeds = study_seeds(run_cfg, args.seeds)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    steps = run_steps(args.run, args.steps)
    model_dir = resolve_model_dir(run_cfg.model)
    evaluations = {step: json.loads((step / "metrics.json").read_text()) for step in steps}
    base_weights, step_weights = verified_weights(args.run, model_dir, evaluations)
    torch.set_num_threads(run_cfg.threads)
    cfg = run_cfg.evaluate
    judge = load_judge(args.judge or run_cfg.judge).eval()
    bars = dict(run_cfg.check.bars)
    out = args.run / RESULTS / sentence_folder(template)
    print(f"reading {args.run}: base and {len(steps)} steps under {len(seeds)} seeds", flush=True)
    if template is not None:
        print(f"every image from {template!r}, the evaluation seeds' too: not the sentence the loop reads", flush=True)
    if args.base_from is not None:
        take_base_from(args.base_from, run_cfg, base_weights, out / "base.json", template=template)

    def evaluation_judged(evaluation: dict) -> list[dict]:  # the loop's images of this sentence (evaluate.templates)
        return [r for r in evaluation["judged"] if sentence_of(r) == (template or EVAL_TEMPLATE)]

    base_evaluation = json.loads((args.run / "base" / "metrics.json").read_text())
    base_judged = judged_on(model_dir, base_weights, evaluation_judged(base_evaluation), seeds, out / "base.json",
                            judge, cfg, template=template)  # fmt: skip
    rows = []
    for step, evaluation in evaluations.items():
        judged = judged_on(step / "pipeline", step_weights[step], evaluation_judged(evaluation), seeds,
                           out / f"{step.name}.json", judge, cfg, template=template)  # fmt: skip
        sets = {k: evaluation[k] for k in ("forgotten", "neighbors", "replayed")}
        index, concept = step_request(step)
        noise = step_noise(judged, base_judged, sets, judge.domains, seeds, len(cfg.seeds), bars)
        counts = concept_counts(judged, base_judged, sets, judge.domains, seeds)
        rows.append({"index": index, "concept": concept, "step": step.name, "bars": noise, "concepts": counts})
        print(f"{step.name}: " + ", ".join(f"{k} {v['pooled']:.1f} [{min(v['groups']):.1f}-{max(v['groups']):.1f}]"
                                           for k, v in noise.items()), flush=True)  # fmt: skip
    write_json(out / "bars_noise.json", {"run": str(args.run), "seeds": seeds, "group": len(cfg.seeds), "bars": bars,
                                         "template": template, "steps": rows})  # fmt: skip
    with atomic_file(out / "bars_noise.md") as tmp:
        tmp.write_text(format_markdown(args.run, seeds, len(cfg.seeds), rows, template))
    print(f"results in {out / 'bars_noise.json'} and {out / 'bars_noise.md'}")


if __name__ == "__main__":
    main()
