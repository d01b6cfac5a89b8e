"""How stable the step's neighbour choice is: a concept's closest concepts under score probes of
several sizes and seeds.

    python -m distill_forget.probe_ranking --concept dots [--model FOLDER] [--latents 16 64]
                                           [--seeds 5] [--top-k K] [--forgotten star ...]

The step ranks the concepts of the concept's kind by score distance from its prompt, averaged over
`step.score.latents` noisy latents drawn from `step.seed` (configs/step.yaml), protects the `top_k`
closest and maps the concept onto the closest of the others (closest on average over its forget
sentences, so not always the first after them here). For each probe size this prints the ranking
under `--seeds` probe seeds (the protected ones before the bar) and how many seeds protect the same
set as the most common one: where they disagree, the choice rests on the probe's draw.
"""

import argparse
from collections import Counter
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from distill_forget.config import read_config, resolve_model_dir
from distill_forget.distill.networks import Denoiser, prompt_encoder
from distill_forget.distill.prompts import concept_prompt, neighbor_pool
from distill_forget.distill.targets import ScoreDistances, ScoreProbe, choose_neighbors
from distill_forget.pipelines import load_pipeline
from distill_forget.world import concepts

SHOWN_AFTER = 2  # ranked concepts printed after the protected ones


@torch.no_grad()
def rankings(model_dir, concept: str, latents: list[int], seeds: int, forgotten=()) -> dict[int, list[dict]]:
    """{probe size: [{concept: distance}, closest first, one per seed 0..seeds-1]}, as the step ranks them."""
    pipe = load_pipeline(model_dir)
    teacher = Denoiser(pipe.unet.requires_grad_(False).eval())
    encoder = prompt_encoder(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kind = concepts.kind_of(concept)
    pool = neighbor_pool(kind, {concept, *forgotten})
    table = {}
    for k in latents:
        table[k] = []
        for seed in range(seeds):
            distances = ScoreDistances(teacher, encoder, ScoreProbe(teacher.latent_shape, k, seed, noise_scheduler))
            _, record = choose_neighbors("score", concept_prompt(concept, kind), pool, len(pool), [], distances)
            table[k].append(record["distance"])
    return table


def agreement(ranked: list[dict], top_k: int) -> tuple[frozenset, int]:
    """The most common set of the `top_k` closest over the seeds' rankings, and how many seeds give it."""
    counts = Counter(frozenset(list(r)[:top_k]) for r in ranked)
    return counts.most_common(1)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", required=True, help="a MiniCanvas concept")
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder; default: the shipped model")
    parser.add_argument("--latents", nargs="+", type=int, default=[16, 64], help="probe sizes K to compare")
    parser.add_argument("--seeds", type=int, default=5, help="probe seeds 0..N-1 per size")
    parser.add_argument("--top-k", type=int, default=None, help="neighbours protected; default: step.neighbors.top_k")
    parser.add_argument("--forgotten", nargs="*", default=[], help="concepts earlier requests removed (not ranked)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads; default: configs/evaluate.yaml's")
    args = parser.parse_args(argv)
    known = concepts.OBJECTS + concepts.STYLES
    for name in (args.concept, *args.forgotten):
        if name not in known:
            raise SystemExit(f"{name!r} is not a MiniCanvas concept ({', '.join(known)})")
    top_k = args.top_k or read_config("step").neighbors.top_k
    torch.set_num_threads(args.threads or read_config("evaluate").threads)
    table = rankings(resolve_model_dir(args.model), args.concept, args.latents, args.seeds, args.forgotten)
    for k, ranked in table.items():
        print(f"K={k} probe latents")
        for seed, distance in enumerate(ranked):
            shown = [f"{c} {d:.2f}" for c, d in list(distance.items())[: top_k + SHOWN_AFTER]]
            print(f"  seed {seed}: {', '.join(shown[: top_k])} | {', '.join(shown[top_k :])}")
        chosen, count = agreement(ranked, top_k)
        print(f"  {count} of {len(ranked)} seeds protect {sorted(chosen)}")


if __name__ == "__main__":
    main()
