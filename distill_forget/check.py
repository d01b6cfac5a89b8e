"""The loop's check of each request, and its retry with another target (train.yaml `check`).

After a request is trained, the judge looks at the student's images on the check seeds, which
the reported evaluation never uses (so the reported figures do not select themselves). When a
bar breaks (UA over every concept forgotten so far; IRA, CRA, NRA as % of the base model's on
the same images), the request is trained again from the same teacher with the target it was
mapped onto excluded (`step.target.exclude`), up to `check.retries` times; the first attempt that
holds every bar is kept, else the one furthest from breaking them (the least summed shortfall).

Every attempt is a folder of its own, `steps/<i>-<concept>/attempts/<k>/`, written whole, with its
check beside it (`<k>.json`); a killed run goes on from the last finished one. The kept attempt is
then renamed to the step's `pipeline/`.
"""

import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from distill_forget.distill.step import run_step
from distill_forget.distill.targets import main_target
from distill_forget.evaluate import evaluate_pipeline
from distill_forget.metrics import compute_metrics
from distill_forget.pipelines import load_pipeline
from distill_forget.storage import write_json

CHECKED = ("ua", "ira", "cra", "nra")  # quality is not checked: no setting of the step holds it on MiniCanvas


def check_settings(cfg) -> None:
    """`check`, refused before any work when it is not usable."""
    check = cfg.check
    if not isinstance(check.retries, int) or check.retries < 0:
        raise SystemExit(f"check.retries must be an integer >= 0 (got {check.retries!r})")
    if not check.retries:
        return
    if cfg.setting != "sequential" or cfg.step.world != "minicanvas":
        raise SystemExit("check.retries needs setting=sequential and step.world=minicanvas (the judge's grid)")
    if not check.seeds or set(check.seeds) & set(cfg.evaluate.seeds):
        raise SystemExit(f"check.seeds {list(check.seeds)} must be given and share none of evaluate.seeds "
                         f"{list(cfg.evaluate.seeds)}: the check would select on the reported evaluation's "
                         "images")  # fmt: skip
    unknown = set(check.bars) - set(CHECKED)
    if unknown:
        raise SystemExit(f"check.bars: {sorted(unknown)} are not checked (only {', '.join(CHECKED)})")


def check_evaluation(cfg):
    """The evaluation settings of the check: `evaluate` on the check seeds."""
    return OmegaConf.merge(cfg.evaluate, {"seeds": list(cfg.check.seeds)})


def evaluate_base_check(model_dir: Path, judge, cfg, path: Path, device, ranks) -> None:
    """The starting model's judgements on the check seeds, into `path` (rank 0)."""
    pipe = load_pipeline(model_dir, device)
    result, _ = evaluate_pipeline(pipe, judge, check_evaluation(cfg), ranks=ranks)
    if result is not None:
        write_json(path, {"seeds": list(cfg.check.seeds), "judged": result["judged"]})


def against_bars(metrics: dict, base: dict) -> dict[str, float]:
    """What the bars compare: UA as it is; IRA, CRA and NRA as % of the base model's value on the
    same images. Metrics not measured (None, or a base value of 0) are left out."""
    reached = {}
    for name, value in metrics.items():
        if value is not None and (name == "ua" or base.get(name)):
            reached[name] = round(value if name == "ua" else 100.0 * value / base[name], 2)
    return reached


def broken_bars(metrics: dict, base: dict, bars) -> dict[str, float]:
    """{metric: how many points it is under its bar} for the bars `metrics` breaks (`against_bars`)."""
    reached = against_bars(metrics, base)
    return {name: round(bar - value, 2) for name, bar in bars.items() if (value := reached.get(name, bar)) < bar}


def check_student(student_dir: Path, judge, cfg, sets: dict, base_judged: list, device, ranks) -> dict | None:
    """The check of one trained student (rank 0; None on the other ranks)."""
    started = time.time()
    pipe = load_pipeline(student_dir, device)
    result, _ = evaluate_pipeline(pipe, judge, check_evaluation(cfg), sets["forgotten"], None, sets["replayed"], ranks)
    if result is None:
        return None
    base = compute_metrics(base_judged, judge.domains, sets["forgotten"], result["neighbors"], sets["replayed"])
    metrics = {k: result["metrics"][k] for k in CHECKED}
    base_metrics = {k: base["metrics"][k] for k in CHECKED}
    broken = broken_bars(metrics, base_metrics, cfg.check.bars)
    return {
        "metrics": metrics,
        "base_metrics": base_metrics,
        "against_bars": against_bars(metrics, base_metrics),
        "broken": broken,
        "holds": not broken,
        "seconds": round(time.time() - started, 1),
    }


def kept_attempt(attempts: list[dict]) -> int:
    """The first attempt that holds, else the one with the least summed shortfall (the first of equals)."""
    held = [k for k, a in enumerate(attempts) if a["check"]["holds"]]
    if held:
        return held[0]
    return min(range(len(attempts)), key=lambda k: sum(attempts[k]["check"]["broken"].values()))


def decided(attempts: list[dict], retries: int) -> bool:
    """Whether no further attempt is made: the last holds, the retries are spent, or no other target is left."""
    last = attempts[-1]
    return last["check"]["holds"] or len(attempts) > retries or not last["others"]


def finished_attempts(attempts_dir: Path) -> list[dict]:
    """The attempts trained and checked so far, in order (each `<k>.json`)."""
    attempts = []
    while (path := attempts_dir / f"{len(attempts)}.json").exists():
        attempts.append(json.loads(path.read_text()))
    return attempts


def train_checked(cfg, request, teacher_dir, folder: Path, judge, device, ranks, sets_for, run_step_kwargs: dict,
                  trained_before, say=print):  # fmt: skip
    """Train `request`, check it, retry with other targets; the kept attempt becomes `folder/pipeline`.

    `sets_for(step_record)`: the concepts counted as forgotten and replayed after the attempt.
    `trained_before(student_dir)`: the step record of a finished student there, else None.
    Returns (the kept attempt's step record, {"kept": its index, "attempts": [...]}, the seconds
    the attempts took, training and checks).
    """
    pipeline_dir, attempts_dir = folder / "pipeline", folder / "attempts"
    base_judged = json.loads((folder.parent.parent / "base" / "check.json").read_text())["judged"]
    attempts = finished_attempts(attempts_dir)
    while trained_before(pipeline_dir) is None:
        if attempts and decided(attempts, cfg.check.retries):
            if ranks.is_main:
                os.replace(attempts_dir / str(kept_attempt(attempts)), pipeline_dir)
            ranks.barrier()
            break
        k = len(attempts)
        student_dir = attempts_dir / str(k)
        excluded = [a["target"] for a in attempts]
        step_cfg = OmegaConf.merge(cfg.step, {"target": {"exclude": excluded}}) if excluded else cfg.step
        step_record = trained_before(student_dir)
        if step_record is None:
            if excluded:
                say(f"[check] {request.concept!r}: attempt {k + 1}, without the targets {excluded}", flush=True)
            step_record = run_step(teacher_dir, request, step_cfg, student_dir,
                                   checkpoint_dir=folder / "checkpoints" / str(k), **run_step_kwargs)  # fmt: skip
        target = main_target(step_record["targets"].get("counts", {}))
        check = check_student(student_dir, judge, cfg, sets_for(step_record), base_judged, device, ranks)
        check = ranks.broadcast(check)  # rank 0's; the others drew their share of the images
        others = [c for c in step_record["targets"].get("candidates", []) if c not in {*excluded, target}]
        attempt = {"target": target, "others": others if target else [], "check": check,
                   "seconds": step_record["seconds"]["total"]}  # fmt: skip
        if ranks.is_main:
            write_json(attempts_dir / f"{k}.json", attempt)
        attempts.append(attempt)
        verdict = "holds" if check["holds"] else f"breaks {check['broken']} (points under the bars)"
        reached = [str(check["against_bars"].get(name)) for name in CHECKED]
        say(f"[check] {request.concept!r} onto {target!r}, on the check seeds: UA {reached[0]}, IRA / CRA / NRA "
            f"{' / '.join(reached[1:])} % of base; {verdict}", flush=True)  # fmt: skip
    if ranks.is_main:
        for k in range(len(attempts)):  # the attempts not kept (the kept one is renamed)
            shutil.rmtree(attempts_dir / str(k), ignore_errors=True)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    finished = trained_before(pipeline_dir)
    if not attempts:  # trained before the check was switched on
        return finished, None, finished["seconds"]["total"]
    seconds = sum(a["seconds"] + a["check"]["seconds"] for a in attempts)
    return finished, {"kept": kept_attempt(attempts), "attempts": attempts}, seconds
