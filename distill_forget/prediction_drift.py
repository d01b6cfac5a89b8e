"""How a step changed the predictions of the prompts it should have left alone, and how much of
that change is the same at every position.

    python -m distill_forget.prediction_drift --teacher FOLDER --student FOLDER [--forgotten a b ...]
                                              [--timesteps 50 200 400 600 800 950]

For the evaluation sentence of every retained MiniCanvas (object, style) pair (none naming a
`--forgotten` concept), at latents the teacher samples for it (guided, as the evaluation
samples), noised to each timestep t, this prints the mean squared difference student - teacher
of three predictions: the conditional one `c`, the empty prompt's `u`, and the guided one
`u + w (c - u)` the evaluation's sampler follows (w its guidance scale); for each, the share of
that difference which is each latent channel's spatial mean (what `step.replay.mean_weight`
weighs), and for the guided one the mean itself per channel. A change common to every position
and every prompt, with the same sign at every t, is one the sampler adds up over its steps into
a colour cast of every image, although the plain mean squared difference counts it little.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.config import load_config
from distill_forget.distill.objectives import per_sample, per_sample_spatial_mean
from distill_forget.evaluate import retained_pairs
from distill_forget.step_probe import StepProbe
from distill_forget.world import concepts


def spatial_mean_share(difference: torch.Tensor) -> float:
    """The share of a difference's mean square (N, C, H, W) that is each channel's spatial mean."""
    whole = per_sample(difference).mean()
    return float(per_sample_spatial_mean(difference).mean() / whole) if whole > 0 else 0.0


@torch.no_grad()
def prediction_drift(teacher_dir, student_dir, prompts: list[str], timesteps, sampling_steps=20, guidance=6.0, seed=0):
    """One row per timestep: the student - teacher difference of the conditional, empty-prompt and
    guided predictions on `prompts` (mean square, share that is the spatial mean), and the guided
    difference's spatial mean per latent channel."""
    probe = StepProbe(teacher_dir, student_dir, sampling_steps, guidance)
    condition, empty = probe.encode(prompts), probe.encode([""] * len(prompts))
    z0 = probe.sample(condition, seed)
    rows = []
    for t in timesteps:
        x_t, t_batch = probe.noised(z0, t, seed)
        outputs = {}
        for name, network in (("teacher", probe.teacher), ("student", probe.student)):
            c, u = network(x_t, t_batch, condition), network(x_t, t_batch, empty)
            outputs[name] = {"conditional": c, "empty": u, "guided": u + guidance * (c - u)}
        row = {"t": int(t)}
        for kind in ("conditional", "empty", "guided"):
            difference = outputs["student"][kind] - outputs["teacher"][kind]
            row[kind] = {"mse": float(per_sample(difference).mean()), "mean_share": spatial_mean_share(difference)}
        guided = outputs["student"]["guided"] - outputs["teacher"]["guided"]
        row["guided"]["channel_means"] = guided.mean((0, 2, 3)).tolist()
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the step's teacher pipeline folder")
    parser.add_argument("--student", type=Path, required=True, help="the step's output pipeline folder")
    parser.add_argument("--forgotten", nargs="*", default=[], help="concepts whose pairs are left out")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[50, 200, 400, 600, 800, 950])
    args = parser.parse_args(argv)
    cfg = load_config("evaluate", [])
    torch.set_num_threads(cfg.threads)
    prompts = [concepts.eval_prompt(o, s) for o, s in retained_pairs(args.forgotten, 1)]
    if not prompts:
        raise SystemExit("no retained (object, style) pair is left: every pair names a --forgotten concept")
    rows = prediction_drift(args.teacher, args.student, prompts, args.timesteps, cfg.sampling_steps, cfg.guidance_scale)
    print(f"{len(prompts)} retained prompts; student - teacher: mean square (share that is the spatial mean)")
    print(f"{'t':>4}  {'conditional':>18}  {'empty prompt':>18}  {'guided':>18}  guided spatial mean per channel")
    for row in rows:
        cells = [f"{row[k]['mse']:9.2e} ({row[k]['mean_share']:4.2f})" for k in ("conditional", "empty", "guided")]
        means = " ".join(f"{v:+.4f}" for v in row["guided"]["channel_means"])
        print(f"{row['t']:>4}  " + "  ".join(f"{c:>18}" for c in cells) + f"  {means}")


if __name__ == "__main__":
    main()
