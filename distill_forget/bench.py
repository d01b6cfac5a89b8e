"""Unlearning methods compared on one request sequence.

    python -m distill_forget.bench [config=bench-quick] [methods=[distill,esd-x]] [out=DIR] [jobs=N] [KEY=VALUE ...]

Each method is a named file of settings, `configs/methods/<name>.yaml` (step settings under
`step:`, the loop's `setting:` and `merge:`). Every method runs the loop `python -m distill_forget.train`
over the same requests in its own run folder `OUT/<method>/`, evaluated after every request
with the same prompts, seeds and judge (methods may not change the evaluation; the starting
model is evaluated once and shared). Arguments that are not bench settings (`step.steps=50`,
`evaluate.seeds=[0]`, ...) go to every method's loop, after the method's own settings and
the bench config's `train` arguments (so they override both). With `jobs` above 1, that many
methods run at a time, each loop in its own process. Writes OUT/bench.json, OUT/bench.md and OUT/bench.png: final
values and per-request curves of UA / IRA / CRA / NRA / quality / cumulative cost. Rerunning
the same command reuses finished requests (the loop skips them, weights verified).
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from distill_forget import train
from distill_forget.config import CONFIG_DIR, LOOP_SECTIONS, load_config, read_config
from distill_forget.report import MAIN_METRICS, RETENTION, TITLES, _is_number, _request_axis, _save_png
from distill_forget.storage import atomic_file, write_json

METHODS_DIR = CONFIG_DIR / "methods"
METHOD_KEYS = ("description", "inherit", "step", "setting", "merge")  # what a method file may set; never the evaluation
BASE_FILES = ("metrics.json", "images.pt", "grid.png")
BASE_METHOD_PREFIX = "_"  # configs/methods/_name.yaml: settings that method files inherit, not a method


def is_base_method(name: str) -> bool:
    return name.startswith(BASE_METHOD_PREFIX)


def flatten(mapping, prefix: str = "") -> list[str]:
    """A nested mapping as `key=value` arguments whose values parse back to the same YAML values."""
    args = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            args += flatten(value, f"{prefix}{key}.")
        else:
            args.append(f"{prefix}{key}={json.dumps(value)}")
    return args


def method_files() -> list[str]:
    """The names of the runnable methods: every file of METHODS_DIR but the shared bases (`_name.yaml`)."""
    return sorted(p.stem for p in METHODS_DIR.glob("*.yaml") if not is_base_method(p.stem))


def read_method(name: str, chain: tuple[str, ...] = ()) -> dict:
    """The settings of `configs/methods/<name>.yaml`, merged over those of the file it names in `inherit`."""
    path = METHODS_DIR / f"{name}.yaml"
    if name in chain:
        raise SystemExit(f"method {chain[0]!r}: `inherit` goes round in a circle: {' -> '.join([*chain, name])}")
    if not path.is_file():
        if chain:
            raise SystemExit(f"method {chain[-1]!r} inherits {name!r}: no file {path}")
        raise SystemExit(f"method {name!r}: no file {path} (methods: {', '.join(method_files())})")
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    bad = [key for key in data if key not in METHOD_KEYS]
    if bad:
        raise SystemExit(
            f"{path}: {bad} cannot be set by a method (allowed: {', '.join(METHOD_KEYS)}); "
            "every method is evaluated with the same requests, model, judge and evaluation settings"
        )
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    inherited = read_method(parent, (*chain, name))
    inherited.pop("description", None)  # a description is the file's own
    return OmegaConf.to_container(OmegaConf.merge(inherited, data))


def load_method(name: str) -> tuple[str, list[str]]:
    """(description, train arguments) of `configs/methods/<name>.yaml`, with what it inherits."""
    if is_base_method(name):
        known = ", ".join(method_files())
        raise SystemExit(f"{name!r} is a base that method files inherit, not a method (methods: {known})")
    data = read_method(name)
    description = data.pop("description", name)
    return description, flatten(data)


def split_arguments(argv: list[str], bench_keys) -> tuple[list[str], list[str]]:
    """(bench arguments, arguments for every method's loop): a key is the bench's if its first part is."""
    ours = [a for a in argv if a.split("=", 1)[0].split(".")[0] in bench_keys or a in ("-h", "--help")]
    return ours, [a for a in argv if a not in ours]


def share_base(first_run: Path, run_dir: Path) -> None:
    """The starting model's evaluation, done once for all methods (same model, judge, settings)."""
    if train.load_base(run_dir) is None and train.load_base(first_run) is not None:
        (run_dir / "base").mkdir(parents=True, exist_ok=True)
        for name in BASE_FILES:
            with atomic_file(run_dir / "base" / name) as tmp:
                shutil.copyfile(first_run / "base" / name, tmp)


def method_summary(name: str, description: str, run_dir: Path, args: list[str]) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    steps = [
        {
            "index": s["index"],
            "concept": s["concept"],
            "setting": s.get("setting", "sequential"),
            "metrics": {k: s["metrics"].get(k) for k in MAIN_METRICS},
            "relative_to_base": {f"{k}_rel": s["relative_to_base"].get(f"{k}_rel") for k in RETENTION},
            "seconds": s["seconds"],
            "cumulative_seconds": s["cumulative_seconds"],
            "threads": s.get("threads"),
        }
        for s in report["steps"]
    ]
    base = {k: report["base"]["metrics"].get(k) for k in MAIN_METRICS}
    return {"description": description, "run_dir": str(run_dir), "arguments": args, "base": base, "steps": steps,
            "over_requests": over_requests(steps)}  # fmt: skip


def over_requests(steps: list[dict]) -> dict:
    """The whole curve in a few numbers: the means over the requests of UA and of retention vs base, and the lowest
    retention any request left. The last request alone hides a method that collapsed half-way, or a regulariser that
    bought its retention by forgetting less all along."""

    def values(group: str, key: str) -> list[float]:
        return [s[group][key] for s in steps if _is_number(s[group].get(key))]

    def mean(v: list[float]) -> float | None:
        return round(sum(v) / len(v), 1) if v else None

    summary = {"ua_mean": mean(values("metrics", "ua"))}
    for k in RETENTION:
        retention = values("relative_to_base", f"{k}_rel")
        summary[f"{k}_rel_mean"], summary[f"{k}_rel_min"] = mean(retention), min(retention, default=None)
    return summary


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # config=bench-quick merges configs/bench-quick.yaml over configs/bench.yaml (config.load_config)
    ours, forwarded = split_arguments(argv, {"config", *read_config("bench").keys()})
    cfg = load_config("bench", ours, __doc__)
    common = [f"requests={cfg.requests}", f"threads={cfg.threads}"]
    common += [f"{key}={value}" for key, value in (("model", cfg.model), ("judge", cfg.judge)) if value]
    out = Path(cfg.out)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise SystemExit(f"methods lists a method twice: {list(cfg.methods)}")
    methods = {m: load_method(m) for m in cfg.methods}  # every method file checked before any work,
    # the bench config's `train` and the command line's settings override the method's
    # (config=bench-quick shortens all)
    arguments = {
        m: [*common, *method_args, *cfg.train, *forwarded, f"run_dir={out / m}"]
        for m, (_, method_args) in methods.items()
    }
    for args in arguments.values():  # and every setting, by the loop's own config checks
        loop_cfg = load_config("train", args, sections=LOOP_SECTIONS)
        train.check_loop_settings(loop_cfg)
        if not loop_cfg.evaluate_every_step:
            raise SystemExit("the bench compares evaluations after every request: evaluate_every_step must stay true")

    print(f"bench {out}: {len(methods)} methods on {cfg.requests}, {cfg.jobs} at a time", flush=True)
    if cfg.jobs > 1:
        run_in_parallel(cfg, out, methods, arguments, forwarded)
        return
    summaries, first_run = {}, None
    for number, (method, (description, _)) in enumerate(methods.items(), start=1):
        run_dir, args = out / method, arguments[method]
        print(f"\n[bench {number}/{len(methods)}] {method}: {description}", flush=True)
        if first_run is not None:
            share_base(first_run, run_dir)
        train.main(args)
        first_run = first_run or run_dir
        summaries[method] = method_summary(method, description, run_dir, args)
        # after each method: partial results are readable
        write_bench(out, cfg.requests, summaries, 1, cfg.threads, forwarded)
    print(f"\nbench done: {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")


def run_in_parallel(cfg, out: Path, methods: dict, arguments: dict, command_line: list[str]) -> None:
    """`jobs` methods at a time, each loop in its own process with `threads // jobs` threads.

    The starting model is evaluated once first and shared; each method's output goes to
    OUT/<method>/bench.log. Results are written as methods finish, in the order of `methods`.
    """
    threads = max(1, cfg.threads // cfg.jobs)
    names = list(methods)
    first_run = out / names[0]
    if train.load_base(first_run) is None:
        train.evaluate_base(arguments[names[0]])
    for name in names[1:]:
        share_base(first_run, out / name)
    waiting, running, failed, summaries = list(names), {}, [], {}
    while waiting or running:
        while waiting and len(running) < cfg.jobs:
            name = waiting.pop(0)
            (out / name).mkdir(parents=True, exist_ok=True)
            log = open(out / name / "bench.log", "a")  # noqa: SIM115 - open while the process runs, closed below
            command = [sys.executable, "-m", "distill_forget.train", *arguments[name], f"threads={threads}"]
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            print(f"[bench] {name} started ({methods[name][0]}); log {out / name / 'bench.log'}", flush=True)
        time.sleep(1.0)
        for name, (process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            minutes = (time.time() - started) / 60
            if process.returncode != 0:
                failed.append(name)
                print(
                    f"[bench] {name} FAILED (exit {process.returncode}) after {minutes:.1f} min;"
                    f" see {out / name / 'bench.log'}",
                    flush=True,
                )
                continue
            print(f"[bench] {name} done in {minutes:.1f} min", flush=True)
            summaries[name] = method_summary(name, methods[name][0], out / name, arguments[name])
            write_bench(
                out, cfg.requests, {n: summaries[n] for n in names if n in summaries}, cfg.jobs, threads, command_line
            )
    if failed:
        raise SystemExit(f"bench: methods {failed} failed (their logs: OUT/<method>/bench.log); rerun to continue them")
    print(f"\nbench done: {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")


# ---------------------------------------------------------------- results


def write_bench(
    out: Path, requests: str, summaries: dict, jobs: int = 1, threads: int | None = None, command_line=()
) -> None:
    """`command_line`: the settings given on the bench's command line, over every method's own file."""
    bench = {"requests": requests, "jobs": jobs, "threads_per_method": threads, "command_line": list(command_line),
             "methods": summaries}  # fmt: skip
    write_json(out / "bench.json", bench)
    with atomic_file(out / "bench.md") as tmp:
        tmp.write_text(format_markdown(bench))
    plot_bench(bench, out / "bench.png")


def _cell(value, key: str = "") -> str:
    if not _is_number(value):
        return "-"
    return format(value, ".3g" if key == "quality" else ".1f")


def threads_cell(steps: list[dict]) -> str:
    """The thread counts a method's requests trained with: `2`, `1-2` where they differ, `-` where none was recorded."""
    counts = sorted({s["threads"] for s in steps if s.get("threads")})
    if not counts:
        return "-"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def format_markdown(bench: dict) -> str:
    methods = bench["methods"]
    header = ["method", "setting", "UA", "IRA", "CRA", "NRA", "quality", "IRA / CRA / NRA vs base %", "cumulative s",
              "threads"]
    lines = [
        "# Unlearning methods compared",
        "",
        f"Requests: `{bench['requests']}`. Metrics in % after the last request (quality: Frechet distance,"
        " lower is better); `-` is not measured. Per-request curves below and in `bench.png`."
        f" The last bench command ran its methods {bench.get('jobs', 1)} at a time; a method an earlier command"
        " finished was reused as it ran then. `threads`: the CPU threads each request trained with (`-`: not"
        " recorded); costs compare between methods that ran alike.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, m in methods.items():
        if not m["steps"]:
            continue
        last = m["steps"][-1]
        rel = " / ".join(_cell(last["relative_to_base"].get(f"{k}_rel")) for k in RETENTION)
        cells = [_cell(last["metrics"][k], k) for k in MAIN_METRICS]
        lines.append(
            f"| {name} | {last['setting']} | " + " | ".join(cells)
            + f" | {rel} | {last['cumulative_seconds']:.0f} | {threads_cell(m['steps'])} |"
        )
    lines += ["", "Methods:", ""] + [f"- `{name}`: {m['description']}" for name, m in methods.items()]
    if bench.get("command_line"):  # a method's description names its file's settings, not these
        lines += [
            "",
            "Set on the command line for every method, over its file: "
            + " ".join(f"`{a}`" for a in bench["command_line"]),
        ]
    lines += [
        "",
        "## Over the whole sequence",
        "",
        "Mean over requests 1 to the last of UA and of retention vs base (%),"
        " and the lowest retention any request left.",
        "",
        "| method | requests | mean UA | mean IRA / CRA / NRA vs base % | lowest IRA / CRA / NRA vs base % |",
        "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        if m["steps"]:
            summary = over_requests(m["steps"])
            means, lowest = (" / ".join(_cell(summary[f"{k}_rel_{s}"]) for k in RETENTION) for s in ("mean", "min"))
            lines.append(f"| {name} | {len(m['steps'])} | {_cell(summary['ua_mean'])} | {means} | {lowest} |")
    count = max((len(m["steps"]) for m in methods.values()), default=0)
    for key in [*MAIN_METRICS, "cumulative_seconds"]:
        title = TITLES.get(key, "cumulative cost: wall seconds of training, evaluation excluded")
        lines += [
            "", f"## {title}", "", "| method | " + " | ".join(["0 (base)", *map(str, range(1, count + 1))]) + " |"
        ]
        lines.append("|" + "---|" * (count + 2))
        for name, m in methods.items():
            base = "-" if key == "cumulative_seconds" else _cell(m["base"].get(key), key)
            values = [s[key] if key == "cumulative_seconds" else s["metrics"][key] for s in m["steps"]]
            lines.append(f"| {name} | {base} | " + " | ".join(_cell(v, key) for v in values) + " |")
    return "\n".join(lines) + "\n\n![per-request curves](bench.png)\n"


def plot_bench(bench: dict, path: Path) -> None:
    """One subplot per metric and one for cumulative cost; one line per method, base as request 0."""
    methods = bench["methods"]
    keys = [*MAIN_METRICS, "cumulative_seconds"]
    last = max((s["index"] for m in methods.values() for s in m["steps"]), default=1)
    figure = Figure(figsize=(13.5, 6.8), layout="constrained")
    for position, key in enumerate(keys, start=1):
        axes = figure.add_subplot(2, 3, position)
        for name, m in methods.items():
            start = [(0, 0.0 if key == "cumulative_seconds" else m["base"].get(key))]
            points = start + [
                (s["index"], s[key] if key == "cumulative_seconds" else s["metrics"][key]) for s in m["steps"]
            ]
            points = [(x, y) for x, y in points if _is_number(y)]
            if points:
                axes.plot(*zip(*points), marker="o", label=name)
        axes.set_title(TITLES.get(key, "cumulative cost (wall s)"), fontsize="medium")
        _request_axis(axes, last, "request (0 = base)")
    figure.axes[0].legend(loc="best", fontsize="small")
    _save_png(figure, path)


if __name__ == "__main__":
    main()
