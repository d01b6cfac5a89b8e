"""Replay bank vs per-micro-batch teacher re-sampling on one request: cost, UA and retention.

    python -m distill_forget.replay_comparison [concept=dots kind=style] [out=DIR] [step.KEY=VALUE ...]

Runs the same request from the same model once per `modes` entry with the same number of
optimizer steps, evaluates the base model and each student on the MiniCanvas grid, and writes
OUT/comparison.json and a table (OUT/comparison.md): wall seconds, teacher evaluations, UA,
IRA/CRA/NRA and their never-replayed variants, each also relative to the base model.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill_forget.config import load_config, resolve_model_dir
from distill_forget.distill.step import run_step
from distill_forget.evaluate import load_judge
from distill_forget.metrics import relative_to_base
from distill_forget.pipelines import pick_device
from distill_forget.requests import check_minicanvas, parse_requests
from distill_forget.storage import atomic_file, write_json
from distill_forget.train import base_metrics_for, evaluate_step, load_base

KEYS = ("ua", "ira", "cra", "nra", "ira_unseen", "cra_unseen", "nra_unseen", "quality")


def main(argv=None) -> None:
    cfg = load_config("replay_comparison", argv, __doc__, sections=("step", "evaluate"))
    torch.set_num_threads(cfg.threads)
    out, model_dir = Path(cfg.out), resolve_model_dir(cfg.model)
    request = parse_requests({"requests": [{"concept": cfg.concept, "kind": cfg.kind}]}, "command line", cfg.step)[0]
    check_minicanvas([request])
    judge, device = load_judge(cfg.judge), pick_device(cfg.evaluate.device)
    if load_base(out) is None:
        print("[base] evaluating the starting model", flush=True)
        evaluate_step(
            model_dir, judge, cfg, {"forgotten": [], "replayed": None}, out / "base", device, keep_images=True
        )
    base = load_base(out)
    rows = {}
    for mode in cfg.modes:
        step_cfg = OmegaConf.merge(cfg.step, {"replay": {"mode": mode}})
        print(f"[{mode}] forgetting {cfg.concept!r}", flush=True)
        record = run_step(model_dir, request, step_cfg, out / mode / "pipeline")
        sets = {"forgotten": [cfg.concept], "replayed": record["replayed_concepts"]}
        result = evaluate_step(out / mode / "pipeline", judge, cfg, sets, out / mode, device)
        matched, _ = base_metrics_for(out, base, judge, cfg, sets, result["neighbors"])
        rows[mode] = {
            "seconds": record["seconds"],
            "evaluations": record["evaluations"],
            "neighbors": record["neighbors"]["chosen"],
            "metrics": {k: result["metrics"].get(k) for k in KEYS},
            "base_metrics": {k: matched.get(k) for k in KEYS},
            "relative_to_base": relative_to_base(result["metrics"], matched),
        }
    summary = {"concept": cfg.concept, "kind": cfg.kind, "steps": cfg.step.steps, "modes": rows}
    if {"bank", "per_step"} <= set(rows):
        summary["wall_time_ratio_per_step_over_bank"] = round(
            rows["per_step"]["seconds"]["total"] / rows["bank"]["seconds"]["total"], 2
        )
    write_json(out / "comparison.json", summary)
    table = format_table(summary)
    with atomic_file(out / "comparison.md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"results in {out / 'comparison.json'} and {out / 'comparison.md'}")


def format_table(summary: dict) -> str:
    cols = ["seconds", "teacher evals", *KEYS, "IRA/CRA/NRA vs base %", "unseen vs base %"]
    lines = [f"Forgetting {summary['concept']!r} ({summary['kind']}), {summary['steps']} optimizer steps", "",
             "| mode | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]  # fmt: skip
    first = next(iter(summary["modes"].values()))
    lines.append(
        "| base | - | - | "
        + " | ".join("-" if first["base_metrics"].get(k) is None else str(first["base_metrics"][k]) for k in KEYS)
        + " | - | - |"
    )
    for mode, row in summary["modes"].items():
        rel = row["relative_to_base"]
        seen = " / ".join(str(rel.get(f"{k}_rel", "-")) for k in ("ira", "cra", "nra"))
        unseen = " / ".join(str(rel.get(f"{k}_unseen_rel", "-")) for k in ("ira", "cra", "nra"))
        cells = [
            row["seconds"]["total"], row["evaluations"]["teacher"], *(row["metrics"][k] for k in KEYS), seen, unseen
        ]
        lines.append(f"| {mode} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    if "wall_time_ratio_per_step_over_bank" in summary:
        lines += ["", f"wall time per_step / bank: {summary['wall_time_ratio_per_step_over_bank']}x"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
