"""A run's results for machines and people: report.json, report.md, metrics.png, cost.png.

`write_report(run_dir, base, steps)` takes the base model's evaluation (`{"metrics": {...}}`)
and one dict per finished request (`{"index", "concept", "kind", "metrics", "seconds", ...}`;
other keys, such as the checkpoint path and its hash, are kept in report.json). The base model
is request 0 in tables and plots. Every file is written atomically, so a report is rewritten
after each request and a reader never sees half of one.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from distill_forget.metrics import quality_rise, relative_to_base
from distill_forget.storage import atomic_file, write_json

MAIN_METRICS = ("ua", "ira", "cra", "nra", "quality")  # every report carries these, None when not measured
RETENTION = ("ira", "cra", "nra")
TITLES = {
    "ua": "UA: forgotten concepts not recognised (%)",
    "ira": "IRA: in-domain retain (%)",
    "cra": "CRA: cross-domain retain (%)",
    "nra": "NRA: neighbour retain (%)",
    "quality": "quality: Frechet distance (lower is better)",
}


# Under the table: what the quality comparison is, and how far to trust it.
QUALITY_NOTE = (
    "Quality vs base: the step's Frechet distance over the (object, style) pairs that name no concept "
    "forgotten so far, against the base model's over the same pairs. It comes from the evaluation's few "
    "seeds, so it is noisy and biased: `python -m distill_forget.quality_noise RUN/steps/NN-concept` "
    "gives it over 12 seeds.\n\n"
)


def _with_main_metrics(metrics: dict | None) -> dict:
    metrics = dict(metrics or {})
    return {**{key: metrics.get(key) for key in MAIN_METRICS}, **metrics}


def build_report(base: dict, steps: list[dict]) -> dict:
    """The content of report.json: metrics completed with the main keys, retention vs base, cost."""
    base = {**base, "metrics": _with_main_metrics(base.get("metrics"))}
    cumulative = 0.0
    rows = []
    for step in steps:
        metrics = _with_main_metrics(step.get("metrics"))
        base_metrics = step.get("base_metrics") or base["metrics"]  # the base over the step's own pairs
        cumulative += step.get("seconds") or 0.0
        rows.append(
            {
                **step,
                "metrics": metrics,
                "seconds": step.get("seconds"),
                "cumulative_seconds": round(cumulative, 2),
                "relative_to_base": relative_to_base(metrics, base_metrics),
                "quality_vs_base": quality_rise(metrics["quality"], base_metrics.get("quality")),
            }
        )
    return {"base": base, "steps": rows}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def _metric_cells(metrics: dict) -> list[str]:
    # Percentages to 0.1; a Frechet distance can be anything from 0.01 to 100s.
    return [_cell(metrics[key], ".3g" if key == "quality" else ".1f") for key in MAIN_METRICS]


def format_counts(counts: dict | None) -> str:
    """{name: count} as "checkerboard 27, dots 9"; a target "" (the concept left out of the sentence)
    as ''; "-" when there is nothing."""
    return ", ".join(f"{name or repr('')} {n}" for name, n in counts.items()) if counts else "-"


def request_readings(record: dict) -> dict | None:
    """What the judge read in the images of a ledger record's own concept after its request
    (`read_as`); None for records before 12-04, which keep no readings."""
    return (record.get("read_as") or {}).get(record["request"]["concept"])


def checked_targets(check: dict | None) -> str:
    """The loop's check of a request (`check.retries`) in words: "; tried: mosaic (UA -11.1)", naming
    each attempt not kept with the points it fell under the bars; the kept one too if it broke any."""
    if not check:
        return ""

    def broken(attempt: dict) -> str:
        return ", ".join(f"{k.upper()} -{v}" for k, v in attempt["check"]["broken"].items())

    kept_broken = broken(check["attempts"][check["kept"]])
    tried = [f"{a['target']} ({broken(a)})" for k, a in enumerate(check["attempts"]) if k != check["kept"]]
    under = f"; kept under the bars ({kept_broken})" if kept_broken else ""
    return (f"; tried: {', '.join(tried)}" if tried else "") + under


def _by_sentence(steps: list[dict]) -> str:
    """A table: each request's metrics in each sentence the evaluation drew (`evaluate.templates`)."""
    rows = [(s["index"], sentence, read) for s in steps for sentence, read in (s.get("by_sentence") or {}).items()]
    if not rows:
        return ""
    lines = ["| request | sentence | UA | IRA / CRA / NRA % of base | quality vs base (%) |", "|---|---|---|---|---|"]
    for index, sentence, read in rows:
        base = read.get("base_metrics") or {}
        relative = relative_to_base(read["metrics"], base)
        rise = quality_rise(read["metrics"].get("quality"), base.get("quality"))
        lines.append(f"| {index} | {sentence} | {_cell(read['metrics'].get('ua'))} | "
                     + " / ".join(_cell(relative.get(f"{key}_rel")) for key in RETENTION)
                     + f" | {'-' if rise is None else f'{rise:+.1f}'} |")  # fmt: skip
    return ("Each sentence the evaluation draws in (`evaluate.templates`; the table above pools them), "
            "against the base model's images in that sentence.\n\n" + "\n".join(lines) + "\n\n")  # fmt: skip


def _where_concepts_went(steps: list[dict]) -> str:
    """A table: each request's concept, the target it was mapped onto, what its images read as."""
    rows = [s for s in steps if s.get("read_as")]
    if not rows:
        return ""
    lines = ["| request | concept | mapped onto (forget prompts) | its images read as (images) |", "|---|---|---|---|"]
    lines += [f"| {s['index']} | {s['concept']} | {format_counts(s.get('targets'))}{checked_targets(s.get('check'))} "
              f"| {format_counts(s['read_as'])} |"
              for s in rows]  # fmt: skip
    return (
        "Where each request's concept went: what the judge reads in its images right after the request. "
        "A concept read as a protected neighbour or as itself, not as its target, was mapped only part of "
        "the way.\n\n" + "\n".join(lines) + "\n\n"
    )


def format_markdown(report: dict) -> str:
    """A markdown table: the base model, then one row per request."""
    header = ["request", "concept", "UA", "IRA", "CRA", "NRA", "quality"]
    header += ["retention vs base (IRA / CRA / NRA %)", "quality vs base (%)", "seconds"]
    base = report["base"]["metrics"]

    def retention(relative: dict) -> str:
        return " / ".join(_cell(relative.get(f"{key}_rel")) for key in RETENTION)

    base_seconds = _cell(report["base"].get("seconds"))
    rows = [["0 (base)", "-", *_metric_cells(base), retention(relative_to_base(base, base)), "-", base_seconds]]
    for step in report["steps"]:
        concept = f"{step.get('concept', '-')} ({step['kind']})" if step.get("kind") else str(step.get("concept", "-"))
        rise = step.get("quality_vs_base")
        cells = [*_metric_cells(step["metrics"]), retention(step["relative_to_base"]),
                 "-" if rise is None else f"{rise:+.1f}", _cell(step["seconds"])]  # fmt: skip
        rows.append([str(step["index"]), concept, *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    total = report["steps"][-1]["cumulative_seconds"] if report["steps"] else 0.0
    settings = sorted({step["setting"] for step in report["steps"] if step.get("setting")})
    return (
        "# Unlearning run report\n\n"
        + (f"Setting: {', '.join(settings)}.\n\n" if settings else "")
        + "Metrics in % (quality: Frechet distance, lower is better); `-` is not measured.\n\n"
        + "\n".join(lines)
        + f"\n\n{len(report['steps'])} requests, {total:.1f} s in all.\n\n"
        + QUALITY_NOTE
        + _by_sentence(report["steps"])
        + _where_concepts_went(report["steps"])
        + "![metrics over requests](metrics.png)\n\n![cumulative cost](cost.png)\n"
    )


def _request_axis(axes, last_index: int, label: str) -> None:
    """Whole-number request ticks, the same span on every plot so they line up."""
    axes.set_xlim(-0.5, max(last_index, 1) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(label)
    axes.grid(alpha=0.3)


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # a canvas of our own: no pyplot, no global backend switch
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def plot_metrics(report: dict, path) -> None:
    """One subplot per metric measured anywhere in the run; base as request 0 and a dashed line."""
    base = report["base"]["metrics"]
    steps = report["steps"]
    def measured(key):
        return any(_is_number(m.get(key)) for m in [base, *(s["metrics"] for s in steps)])

    every_key = dict.fromkeys([*base, *(key for s in steps for key in s["metrics"])])  # in order, once
    names = [key for key in every_key if measured(key)] or list(MAIN_METRICS)
    last_index = max((s["index"] for s in steps), default=0)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    for position, name in enumerate(names, start=1):
        axes = figure.add_subplot(rows, columns, position)
        points = [(0, base.get(name))] + [(s["index"], s["metrics"].get(name)) for s in steps]
        points = [(x, y) for x, y in points if _is_number(y)]
        if points:
            axes.plot(*zip(*points), marker="o")
        if _is_number(base.get(name)):
            axes.axhline(base[name], linestyle="--", color="gray", label="base")
            axes.legend(loc="best", fontsize="small")
        axes.set_title(TITLES.get(name, name), fontsize="medium")
        _request_axis(axes, last_index, "request (0 = base)")
    _save_png(figure, Path(path))


def plot_cost(report: dict, path) -> None:
    """Seconds per request as bars, their running total as a line."""
    steps = report["steps"]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.add_subplot()
    indices = [s["index"] for s in steps]
    axes.bar(indices, [s["seconds"] or 0.0 for s in steps], color="lightgray", label="per request")
    axes.plot(indices, [s["cumulative_seconds"] for s in steps], marker="o", label="cumulative")
    _request_axis(axes, max(indices, default=0), "request")
    axes.set_ylabel("wall seconds")
    axes.set_title("cost")
    axes.legend(loc="upper left")
    _save_png(figure, Path(path))


def write_report(run_dir, base: dict, steps: list[dict]) -> dict[str, Path]:
    """Write report.json, report.md, metrics.png and cost.png into `run_dir`; return their paths."""
    run_dir = Path(run_dir)
    report = build_report(base, steps)
    paths = {name: run_dir / name for name in ("report.json", "report.md", "metrics.png", "cost.png")}
    write_json(paths["report.json"], report)
    with atomic_file(paths["report.md"]) as tmp:
        tmp.write_text(format_markdown(report))
    plot_metrics(report, paths["metrics.png"])
    plot_cost(report, paths["cost.png"])
    return paths
