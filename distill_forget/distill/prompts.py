"""The prompts of a step: forget prompts, their mapped prompts, retain, neighbour and
previously-forgotten prompts.

On MiniCanvas they are built from the world's training templates, never from its
EVAL_TEMPLATE, so retention is measured on sentences the trainer never replayed. Retain replay
is honest: only a seeded share of the world's concepts (`retain.replay_fraction`) is ever
replayed, the rest is held out so evaluation can report retention on concepts the trainer
never saw.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from distill_forget.config import CONCEPT_BANK
from distill_forget.requests import concept_pattern
from distill_forget.world import concepts


@dataclass
class PromptGroups:
    forget: list[str]
    mapped: list[str]  # mapped[i] is forget[i] with the concept replaced by its target
    retain: list[str]
    neighbor: list[str]
    forgotten: list[str]  # prompts of concepts forgotten by earlier requests
    # twins[i]: forget[i] with the concept replaced by each neighbour (the neighbour twin replay)
    twins: list[list[str]] = field(default_factory=list)
    # the teacher's prompt for each forgotten prompt where it is not that prompt (`target.follow`); [] if none
    forgotten_mapped: list[str] = field(default_factory=list)
    # retain_touched[i] / neighbor_touched[i]: retain[i] / neighbor[i] names a concept that was a
    # neighbour or target of an earlier request (`replay.retain_teacher=untouched`)
    retain_touched: list[bool] = field(default_factory=list)
    neighbor_touched: list[bool] = field(default_factory=list)
    # the retained pairs in `regularizers.key_value_anchor.templates`: token states the anchor holds, never replayed
    anchored: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "forget": self.forget,
            "mapped": self.mapped,
            "retain": self.retain,
            "neighbor": self.neighbor,
            "forgotten": self.forgotten,
            "forgotten_mapped": self.forgotten_mapped,
            "anchored": self.anchored,
        }


def replace_concept(prompt: str, concept: str, replacement: str) -> str:
    """The sentence with the concept replaced; "" removes it (and the space it leaves)."""
    return " ".join(concept_pattern(concept).sub(replacement, prompt).split())


# ---------------------------------------------------------------- MiniCanvas


def bank_concepts(path, kind: str) -> list[str]:
    """Candidate neighbours of a `kind` for real models: a YAML file {kind: [names]} (default: the shipped bank)."""
    path = Path(path) if path else CONCEPT_BANK
    if not path.is_file():
        raise FileNotFoundError(f"neighbors.pool: concept bank {path} not found")
    bank = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(bank, dict) or not all(isinstance(v, list) for v in bank.values()):
        raise ValueError(f"concept bank {path} must map each kind to a list of names")
    return [str(name) for name in bank.get(kind, [])]


def world_concepts(kind: str) -> list[str]:
    return list(concepts.OBJECTS if kind == "object" else concepts.STYLES)


def neighbor_pool(kind: str, gone) -> dict[str, str]:
    """{concept: its prompt} for the world's concepts of `kind` not in `gone`: whom a request ranks as neighbours."""
    return {c: concept_prompt(c, kind) for c in world_concepts(kind) if c not in gone}


def other_kind(kind: str) -> str:
    return "style" if kind == "object" else "object"


def concept_prompt(concept: str, kind: str) -> str:
    """A short prompt naming the concept alone, to compare concepts with each other."""
    if kind == "object":
        return concepts.OBJECT_TEMPLATES[0].format(object=concept)
    if kind == "style":
        return concepts.STYLE_TEMPLATES[0].format(style=concept)
    return concept


def in_context(concept: str, kind: str, context: list[str], templates: list[str]) -> list[str]:
    """Training prompts naming `concept`: each pair template (the step's `paraphrases` and more forms,
    checked by the caller) with each `context` concept (of the other kind), then the single-concept
    templates. Never the evaluation template."""
    if kind == "object":
        paired = [t.format(object=concept, style=c) for t in templates for c in context]
        return paired + [t.format(object=concept) for t in concepts.OBJECT_TEMPLATES]
    paired = [t.format(object=c, style=concept) for t in templates for c in context]
    return paired + [t.format(style=concept) for t in concepts.STYLE_TEMPLATES]


def replayable_concepts(fraction: float, seed: int) -> set[str]:
    """The world concepts that retain replay may use: a seeded share of each kind.

    Drawn over the whole world, not over what is still retained, so the never-replayed set
    stays the same from one request to the next and evaluation can track it over a sequence.
    """
    rng = np.random.default_rng(seed)
    chosen = set()
    for kind in ("object", "style"):
        names = world_concepts(kind)
        count = round(fraction * len(names))
        chosen.update(names[i] for i in rng.permutation(len(names))[:count])
    return chosen


def check_pair_templates(templates, setting: str = "retain.extra_templates", allow_evaluation=False) -> list[str]:
    """Sentence forms for the retained pairs, checked: each holds {object} and {style} and is not the
    evaluation's sentence (retention is measured on a sentence no training prompt holds; a reading
    that trains nothing may `allow_evaluation`), and its words are MiniCanvas's."""
    templates, known = list(templates), concepts.vocabulary()
    for template in templates:
        if not concepts.is_pair_template(template):
            raise ValueError(f"{setting}: {template!r} must hold {{object}} and {{style}}")
        if not allow_evaluation and concepts.is_eval_template(template):
            raise ValueError(f"{setting}: {template!r} is the evaluation's sentence (no training prompt holds it)")
        unknown = [w for w in template.replace("{object}", " ").replace("{style}", " ").split() if w not in known]
        if unknown:
            raise ValueError(f"{setting}: {template!r} holds words MiniCanvas's text encoder does not know {unknown} "
                             f"(it reads them as one unknown token; known: {known})")
    return templates


def paraphrases(step_cfg) -> list[str]:
    """The world's paraphrases a MiniCanvas step trains in: all four but its `held_out_paraphrases`, which
    the evaluation may then read (`evaluate.templates`) as sentences the world's model learnt and no step
    trained in."""
    held = [concepts.spaced(t) for t in step_cfg.held_out_paraphrases]
    known = [concepts.spaced(t) for t in concepts.PARAPHRASE_TEMPLATES]
    for template in held:
        if template not in known:
            raise ValueError(f"held_out_paraphrases: {template!r} is not one of the world's paraphrases "
                             f"{concepts.PARAPHRASE_TEMPLATES}")  # fmt: skip
    kept = [t for t in concepts.PARAPHRASE_TEMPLATES if concepts.spaced(t) not in held]
    if not kept:
        raise ValueError("held_out_paraphrases: every paraphrase held out; a step needs at least one to train in")
    return kept


def trained_templates(step_cfg) -> list[str]:
    """Every sentence form a MiniCanvas step writes its prompts in: its `paraphrases`, and its
    `concept_templates`, `retain.extra_templates` and `regularizers.key_value_anchor.templates`."""
    return [*paraphrases(step_cfg), *step_cfg.concept_templates, *step_cfg.retain.extra_templates,
            *step_cfg.regularizers.key_value_anchor.templates]  # fmt: skip


def pair_prompts(replayed: list[str], templates: list[str]) -> list[str]:
    """The replayed objects x replayed styles written in each template."""
    objects = [c for c in replayed if concepts.kind_of(c) == "object"]
    styles = [c for c in replayed if concepts.kind_of(c) == "style"]
    return [t.format(object=o, style=s) for t in templates for o in objects for s in styles]


def retain_prompts(replayed: list[str], templates: list[str]) -> list[str]:
    """Prompts for the replayed concepts, mentioning no other concept: replayed objects x
    replayed styles in each pair template (the step's `paraphrases` and more forms, checked by the
    caller), and each alone in its kind's templates."""
    objects = [c for c in replayed if concepts.kind_of(c) == "object"]
    styles = [c for c in replayed if concepts.kind_of(c) == "style"]
    prompts = pair_prompts(replayed, templates)
    prompts += [t.format(object=o) for t in concepts.OBJECT_TEMPLATES for o in objects]
    prompts += [t.format(style=s) for t in concepts.STYLE_TEMPLATES for s in styles]
    return prompts
