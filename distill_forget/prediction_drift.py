"""How a step changed the predictions of the prompts it should have left alone, and how much of
that change is the same at every position.

    python -m distill_forget.prediction_drift --teacher FOLDER --student FOLDER [--forgotten a b ...]
                                              [--timesteps 50 200 400 600 800 950] [--concept NAME]
                                              [--template "a picture of a {object} in {style} style"]
                                              [--sampling-guidance 1] [--revert to_v to_out ...]
                                              [--of CONCEPT]

For the evaluation sentence (or `--template`'s) of every retained MiniCanvas (object, style) pair
(none naming a `--forgotten` concept), at latents the teacher samples for it (guided, as the
evaluation samples, or at `--sampling-guidance`), noised to each timestep t, this prints the mean
squared difference student - teacher of three predictions: the conditional one `c`, the empty
prompt's `u`, and the guided one `u + w (c - u)` the evaluation's sampler follows (w its guidance
scale); for each, the share of that difference which is each latent channel's spatial mean (what
`step.replay.mean_weight` weighs), and for the guided one the mean itself per channel. A change
common to every position and every prompt, with the same sign at every t, is one the sampler adds
up over its steps into a colour cast of every image, although the plain mean squared difference
counts it little.

`--revert` reads the student with the change of the named cross-attention projections (`to_q`,
`to_k`, `to_v`, `to_out`) put back to the teacher's: which of them carries the drift. `--of` reads
the pairs naming one concept instead of the retained ones (the step's concept: how far its own
prompts moved, which a revert should not take away if the part reverted is not where the
forgetting is).

It also prints the size of the step's weight change (norm, relative to the teacher's weights, mean
absolute element, over the parameters it changed).

With `--concept` (the step's concept) it also prints where in the text the step changed the
cross-attention's value path, what each token hands the image once attended: for every token e of
a prompt, over all `attn2` layers, |(W_o' W_v' - W_o W_v) e| / |W_o W_v e| (student ', teacher
plain; W_v `to_v`, W_o `to_out`'s linear map: a change of one of them that the other undoes is no
change here), averaged over the start token, the other words, the concept's own word pieces, the
end token and the padding after it, for the retained prompts and for the concept's prompts. An
edit local to the concept changes its prompts far more than the rest.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.config import load_config
from distill_forget.distill.networks import prompt_encoder, tokens_and_end
from distill_forget.distill.objectives import per_sample, per_sample_spatial_mean
from distill_forget.distill.regularizers import anchored_map
from distill_forget.evaluate import retained_pairs
from distill_forget.step_probe import StepProbe
from distill_forget.world import concepts
from distill_forget.world.render import grid_pairs

TOKEN_GROUPS = ("start", "words", "concept", "end", "padding")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")  # of every cross-attention layer (attn2)


def spatial_mean_share(difference: torch.Tensor) -> float:
    """The share of a difference's mean square (N, C, H, W) that is each channel's spatial mean."""
    whole = per_sample(difference).mean()
    return float(per_sample_spatial_mean(difference).mean() / whole) if whole > 0 else 0.0


@torch.no_grad()
def prediction_drift(probe: StepProbe, prompts: list[str], timesteps, guidance=6.0, seed=0):
    """One row per timestep: the student - teacher difference of the conditional, empty-prompt and
    guided (at `guidance`) predictions on `prompts` (mean square, share that is the spatial mean),
    and the guided difference's spatial mean per latent channel, at latents the probe's teacher
    samples."""
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


@torch.no_grad()
def revert(student: torch.nn.Module, teacher: torch.nn.Module, projections) -> int:
    """Put the cross-attention `projections` of the student back to the teacher's; the tensors put back."""
    unknown = set(projections) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}; known: {list(PROJECTIONS)}")
    reference, reverted = dict(teacher.named_parameters()), 0
    for name, param in student.named_parameters():
        if any(f".attn2.{projection}." in name for projection in projections):
            param.copy_(reference[name])
            reverted += 1
    return reverted


def pairs_naming(concept: str, option: str) -> list[tuple[str, str]]:
    """Every MiniCanvas (object, style) pair naming `concept`; an error naming `option` if none does."""
    pairs = [(o, s) for o, s in grid_pairs() if concept in (o, s)]
    if not pairs:
        raise SystemExit(f"{option} {concept!r} is no MiniCanvas concept")
    return pairs


def value_paths(unet) -> list[torch.Tensor]:
    """W_o W_v of every cross-attention layer, without the biases: (image width, text width) each."""
    return [anchored_map(m, "value")[:, :-1] for name, m in unet.named_modules() if name.endswith("attn2")]


@torch.no_grad()
def value_path_change(teacher, student, prompts: list[str], concept: str) -> dict[str, float | None]:
    """The relative change of the value path per token group of `prompts` (TOKEN_GROUPS; None
    for a group none of them has), averaged over that group's tokens; teacher and student are
    loaded pipelines."""
    states = prompt_encoder(teacher)(prompts).text  # the text encoder is frozen: the teacher's is the student's
    change, size = torch.zeros(states.shape[:2]), torch.zeros(states.shape[:2])
    for before, after in zip(value_paths(teacher.unet), value_paths(student.unet), strict=True):
        change += (states @ (after - before).T).pow(2).sum(-1)
        size += (states @ before.T).pow(2).sum(-1)
    ratio = (change / size).sqrt()
    ids, end = tokens_and_end(teacher.tokenizer, prompts)
    position = torch.arange(ids.shape[1]).expand_as(ids)
    own = torch.isin(ids, torch.tensor(teacher.tokenizer(concept, add_special_tokens=False).input_ids))
    groups = {
        "start": position == 0,
        "words": (position > 0) & (position < end) & ~own,
        "concept": (position > 0) & (position < end) & own,
        "end": position == end,
        "padding": position > end,
    }
    return {name: float(ratio[mask].mean()) if mask.any() else None for name, mask in groups.items()}


@torch.no_grad()
def weight_change(teacher: torch.nn.Module, student: torch.nn.Module) -> dict[str, float]:
    """Over the parameters the step changed: the change's norm, that norm over the teacher's
    weights' there, its mean absolute element, and how many elements and tensors that covers."""
    changed = [(a, b) for a, b in zip(teacher.parameters(), student.parameters(), strict=True) if not torch.equal(a, b)]
    if not changed:
        return {"norm": 0.0, "relative": 0.0, "mean_abs": 0.0, "elements": 0, "tensors": 0}
    delta = torch.cat([(b - a).flatten() for a, b in changed])
    before = torch.cat([a.flatten() for a, _ in changed])
    return {"norm": float(delta.norm()), "relative": float(delta.norm() / before.norm()),
            "mean_abs": float(delta.abs().mean()), "elements": delta.numel(), "tensors": len(changed)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the step's teacher pipeline folder")
    parser.add_argument("--student", type=Path, required=True, help="the step's output pipeline folder")
    parser.add_argument("--forgotten", nargs="*", default=[], help="concepts whose pairs are left out")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[50, 200, 400, 600, 800, 950])
    parser.add_argument("--concept", help="the step's concept: also where in the text its value path changed")
    parser.add_argument("--template", default=concepts.EVAL_TEMPLATE,
                        help="the retained prompts' sentence (default the evaluation's; the training replays "
                             f"paraphrase it: {'; '.join(concepts.PARAPHRASE_TEMPLATES)})")
    parser.add_argument("--sampling-guidance", type=float, default=None,
                        help="guidance of the teacher trajectories read (default the evaluation's; 1: unguided, "
                             "as the replay bank's)")
    parser.add_argument("--revert", nargs="+", default=[], choices=PROJECTIONS,
                        help="read the student with these attn2 projections' change put back to the teacher's")
    parser.add_argument("--of", dest="of_concept",
                        help="read the pairs naming this concept (the step's: its forgetting), not the retained")
    args = parser.parse_args(argv)
    if not concepts.is_pair_template(args.template):
        raise SystemExit(f"--template {args.template!r}: it must hold {{object}} and {{style}}")
    cfg = load_config("evaluate", [])
    torch.set_num_threads(cfg.threads)
    own = []  # the --concept's own prompts, checked before any model is read
    if args.concept:
        own = [args.template.format(object=o, style=s) for o, s in pairs_naming(args.concept, "--concept")]
    if args.of_concept:
        pairs = pairs_naming(args.of_concept, "--of")
    else:
        pairs = retained_pairs(args.forgotten, 1)
        if not pairs:
            raise SystemExit("no retained (object, style) pair is left: every pair names a --forgotten concept")
    prompts = [args.template.format(object=o, style=s) for o, s in pairs]
    sampling_guidance = cfg.guidance_scale if args.sampling_guidance is None else args.sampling_guidance
    probe = StepProbe(args.teacher, args.student, cfg.sampling_steps, sampling_guidance)
    if args.revert:
        reverted = revert(probe.student_pipe.unet, probe.teacher_pipe.unet, args.revert)
        print(f"the student with {' / '.join(args.revert)} put back to the teacher's ({reverted} tensors)")
    rows = prediction_drift(probe, prompts, args.timesteps, cfg.guidance_scale)
    which = f"of {args.of_concept!r}" if args.of_concept else "retained"
    print(f"{len(prompts)} {which} prompts; student - teacher: mean square (share that is the spatial mean)")
    print(f"{'t':>4}  {'conditional':>18}  {'empty prompt':>18}  {'guided':>18}  guided spatial mean per channel")
    for row in rows:
        cells = [f"{row[k]['mse']:9.2e} ({row[k]['mean_share']:4.2f})" for k in ("conditional", "empty", "guided")]
        means = " ".join(f"{v:+.4f}" for v in row["guided"]["channel_means"])
        print(f"{row['t']:>4}  " + "  ".join(f"{c:>18}" for c in cells) + f"  {means}")

    teacher, student = probe.teacher_pipe, probe.student_pipe
    change = weight_change(teacher.unet, student.unet)
    print(f"\nweight change: norm {change['norm']:.3f} ({100 * change['relative']:.1f} % of the teacher's there), "
          f"mean |element| {change['mean_abs']:.2e}, over {change['elements']} elements in {change['tensors']} tensors")
    if args.concept:
        print("\nvalue path W_o W_v, relative change per token (-: no such token)")
        print(f"{'prompts':>18}  " + "  ".join(f"{group:>7}" for group in TOKEN_GROUPS))
        for label, group in ((f"{len(prompts)} retained", prompts), (f"{len(own)} of {args.concept!r}", own)):
            table = value_path_change(teacher, student, group, args.concept)
            print(f"{label:>18}  " + "  ".join("      -" if v is None else f"{v:7.4f}" for v in table.values()))


if __name__ == "__main__":
    main()
