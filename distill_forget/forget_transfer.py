"""How far a step moved a concept's prompts onto its target, sentence form by sentence form.

    python -m distill_forget.forget_transfer --teacher FOLDER --student FOLDER --concept C --target T
                                             [--timesteps 100 300 500 700 900]

On MiniCanvas, for the evaluation template (never trained on) and each training paraphrase, the
concept is paired with every concept of the other kind: `p_f` those sentences, `p_m` the same
with the target in the concept's place. At latents the teacher samples for `p_f` (guided, as the
evaluation samples), noised to each timestep t, this prints the share of the way still to go:

    || eps(S, x_t, t, p_f) - eps(T, x_t, t, p_m) ||^2 / || eps(T, x_t, t, p_f) - eps(T, x_t, t, p_m) ||^2

averaged over the sentences: 1 where the student still answers as the teacher does, 0 where it
answers as the teacher does for the target. The forget mapping trains on the paraphrases only;
the evaluation template's row shows how much of the removal carries to a sentence never trained on.
"""

import argparse
from pathlib import Path

import torch

from distill_forget.config import load_config
from distill_forget.distill.objectives import per_sample
from distill_forget.distill.prompts import other_kind, replace_concept, world_concepts
from distill_forget.step_probe import StepProbe
from distill_forget.world import concepts


def sentence_forms(concept: str) -> dict[str, list[str]]:
    """{form name: the concept in that form with each concept of the other kind}."""
    kind = concepts.kind_of(concept)
    forms = {
        "evaluation": concepts.EVAL_TEMPLATE,
        **{f"paraphrase {i + 1}": t for i, t in enumerate(concepts.PARAPHRASE_TEMPLATES)},
    }
    fill = (
        (lambda t, c: t.format(object=concept, style=c))
        if kind == "object"
        else (lambda t, c: t.format(object=c, style=concept))
    )
    return {name: [fill(template, c) for c in world_concepts(other_kind(kind))] for name, template in forms.items()}


@torch.no_grad()
def share_left(teacher_dir, student_dir, concept: str, target: str, timesteps, sampling_steps=20, guidance=6.0, seed=0):
    """{form name: [share of the way left at each timestep]}."""
    probe = StepProbe(teacher_dir, student_dir, sampling_steps, guidance)
    teacher, student = probe.teacher, probe.student
    table = {}
    for name, prompts in sentence_forms(concept).items():
        forget, mapped = probe.encode(prompts), probe.encode([replace_concept(p, concept, target) for p in prompts])
        z0 = probe.sample(forget, seed)
        row = []
        for t in timesteps:
            x_t, t_batch = probe.noised(z0, t, seed)
            toward = teacher(x_t, t_batch, mapped)
            left = per_sample(student(x_t, t_batch, forget) - toward)
            whole = per_sample(teacher(x_t, t_batch, forget) - toward).clamp_min(1e-12)
            row.append(float((left / whole).mean()))
        table[name] = row
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the step's teacher pipeline folder")
    parser.add_argument("--student", type=Path, required=True, help="the step's output pipeline folder")
    parser.add_argument("--concept", required=True, help="the MiniCanvas concept the step forgot")
    parser.add_argument("--target", required=True, help="the concept it was mapped onto")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[100, 300, 500, 700, 900])
    args = parser.parse_args(argv)
    cfg = load_config("evaluate", [])
    torch.set_num_threads(cfg.threads)
    table = share_left(
        args.teacher, args.student, args.concept, args.target, args.timesteps, cfg.sampling_steps, cfg.guidance_scale
    )
    width = max(map(len, table))
    print(f"{'share of the way left':<{width}}  " + "  ".join(f"t={t:<4}" for t in args.timesteps))
    for name, row in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{v:6.2f}" for v in row))


if __name__ == "__main__":
    main()
