"""The continual-unlearning metrics (../shared/EVALUATION.md), from judged images. All in %.

Input is one record per generated image: the concepts its prompt named, per domain
(`{"object": "circle", "style": "dots"}`), and what the judge saw (same keys).

- UA: over every forgotten concept, the share of images prompted with it that the judge
  does NOT recognise as it; averaged over forgotten concepts.
- Retained accuracy of a concept: judge accuracy on images prompted with it, leaving out
  images whose prompt also names a forgotten concept (changing those is the point).
- IRA / CRA: for each forgotten concept, mean accuracy over the retained concepts of the
  same / other kinds, neighbours left out; averaged over forgotten concepts.
- NRA: mean accuracy over the designated neighbours of the forgotten concepts.
- `*_unseen`: the same over concepts never replayed during training, when `replayed` is given.
- What the judge reads in the images of each concept (`per_concept[c]["read_as"]`): where a
  forgotten concept went (its target, or a neighbour on the way there), and what took a damaged
  concept's place.
"""

from collections import Counter
from statistics import mean


def _pct(values) -> float | None:
    values = list(values)
    return round(100.0 * mean(values), 2) if values else None


def per_concept(records: list[dict], domains: dict[str, list[str]], forgotten) -> dict[str, dict]:
    """For every concept: its kind, the number of images, the judge's rate for it, and what the
    judge reads in those images (`read_as`: {concept of the same kind: images}, most first).

    `rate` is the forget rate (share NOT recognised) for a forgotten concept, the accuracy
    otherwise, both as fractions. A retained concept's images are those whose prompt names no
    forgotten concept.
    """
    forgotten = set(forgotten)
    table = {}
    for kind, names in domains.items():
        for concept in names:
            seen = [
                r["seen"][kind]
                for r in records
                if r["prompt"][kind] == concept and (concept in forgotten or not forgotten & set(r["prompt"].values()))
            ]
            hits = [(s != concept) if concept in forgotten else (s == concept) for s in seen]
            table[concept] = {
                "kind": kind,
                "images": len(hits),
                "rate": mean(hits) if hits else None,
                "read_as": dict(Counter(seen).most_common()),
            }
    return table


def compute_metrics(
    records: list[dict],
    domains: dict[str, list[str]],
    forgotten=(),
    neighbors=(),
    replayed=None,
) -> dict:
    """Aggregate metrics and the per-concept table for one evaluated model."""
    unknown = (set(forgotten) | set(neighbors)) - {c for names in domains.values() for c in names}
    if unknown:
        raise KeyError(f"concepts {sorted(unknown)} are not judged by this judge (domains: {domains})")
    table = per_concept(records, domains, forgotten)
    forgotten = list(forgotten)
    neighbors = [n for n in neighbors if n not in forgotten]
    kinds = {c: row["kind"] for c, row in table.items()}

    def retained(kind_test, pool):
        return [c for c in pool if kind_test(kinds[c]) and c not in forgotten and c not in neighbors]

    def rated(names):
        return [table[c]["rate"] for c in names if table[c]["rate"] is not None]

    def per_forgotten(same_kind: bool, pool):
        scores = []
        for f in forgotten:
            names = retained(lambda k: (k == kinds[f]) == same_kind, pool)  # noqa: B023 - called here, in the loop
            if rated(names):
                scores.append(mean(rated(names)))
        return _pct(scores)

    every = list(table)
    metrics = {
        f"{kind}_accuracy": _pct(r["seen"][kind] == r["prompt"][kind] for r in records) for kind in domains
    }
    metrics.update(
        ua=_pct(rated(forgotten)),
        ira=per_forgotten(True, every),
        cra=per_forgotten(False, every),
        nra=_pct(rated(neighbors)),
    )
    if replayed is not None:
        unseen = [c for c in every if c not in set(replayed)]
        metrics.update(
            ira_unseen=per_forgotten(True, unseen),
            cra_unseen=per_forgotten(False, unseen),
            nra_unseen=_pct(rated(n for n in neighbors if n in unseen)),
        )
    roles = {c: "forgotten" if c in forgotten else "neighbor" if c in neighbors else "retained" for c in every}
    concepts = {c: {**row, "role": roles[c], "rate": _pct([row["rate"]]) if row["rate"] is not None else None}
                for c, row in table.items()}  # fmt: skip
    return {"metrics": metrics, "per_concept": concepts}


def quality_rise(quality, base_quality) -> float | None:
    """How far a quality figure (a distance: lower is better) is above the base model's, in %."""
    if not isinstance(quality, (int, float)) or isinstance(quality, bool) or not base_quality:
        return None
    return round(100.0 * (quality / base_quality - 1), 2)


def relative_to_base(metrics: dict, base: dict) -> dict:
    """Retention relative to the base model (`IRA_i / IRA_0`), in %."""
    out = {}
    for key in ("ira", "cra", "nra", "ira_unseen", "cra_unseen", "nra_unseen"):
        if metrics.get(key) is not None and base.get(key):
            out[f"{key}_rel"] = round(100.0 * metrics[key] / base[key], 2)
    return out
