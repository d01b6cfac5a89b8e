"""The concepts of MiniCanvas: objects, styles, close-neighbour groups and prompt templates.

MiniCanvas is the UnlearnCanvas benchmark (styles x objects) in miniature. Neighbour groups
are designed on purpose: their members look alike and share words, so damage to close
concepts is measurable.
"""

OBJECTS = [
    "circle",
    "ring",
    "square",
    "hollow square",
    "diamond",
    "triangle",
    "cross",
    "plus sign",
    "star",
    "heart",
    "crescent",
    "arrow",
]

STYLES = [
    "stripes",
    "thin stripes",
    "diagonal stripes",
    "dots",
    "big dots",
    "flat color",
    "pastel color",
    "checkerboard",
    "gradient",
    "sketch",
    "neon",
    "mosaic",
]

NEIGHBOR_GROUPS = [
    ["circle", "ring"],
    ["square", "hollow square", "diamond"],
    ["cross", "plus sign"],
    ["stripes", "thin stripes", "diagonal stripes"],
    ["dots", "big dots"],
    ["flat color", "pastel color"],
]

# The evaluation always uses EVAL_TEMPLATE; unlearning requests train on the others, so
# retention is never measured on the very sentences that were replayed.
EVAL_TEMPLATE = "a {object} in {style} style"
PARAPHRASE_TEMPLATES = [
    "a picture of a {object} in {style} style",
    "a drawing of a {object} , {style} style",
    "a {style} style image of a {object}",
    "{object} rendered in {style} style",
]
FULL_TEMPLATES = [EVAL_TEMPLATE, *PARAPHRASE_TEMPLATES]
OBJECT_TEMPLATES = ["a {object}", "a picture of a {object}", "a drawing of a {object}"]
STYLE_TEMPLATES = ["an image in {style} style", "a picture in {style} style", "{style} style"]


def kind_of(concept: str) -> str:
    """'object' or 'style' for a MiniCanvas concept; KeyError naming it otherwise."""
    if concept in OBJECTS:
        return "object"
    if concept in STYLES:
        return "style"
    raise KeyError(f"unknown MiniCanvas concept {concept!r}; known: {OBJECTS + STYLES}")


def neighbors_of(concept: str) -> list[str]:
    """The designed close neighbours of a concept (empty if it has none)."""
    kind_of(concept)
    for group in NEIGHBOR_GROUPS:
        if concept in group:
            return [c for c in group if c != concept]
    return []


def is_pair_template(template: str) -> bool:
    """A sentence an (object, style) pair can fill: it holds both {object} and {style}."""
    return "{object}" in template and "{style}" in template


def spaced(template: str) -> str:
    """A sentence with its words one space apart, to compare sentences however they are spaced."""
    return " ".join(template.split())


def is_eval_template(template: str) -> bool:
    """The evaluation's sentence, however it is spaced."""
    return spaced(template) == EVAL_TEMPLATE


def eval_prompt(obj: str, style: str) -> str:
    return EVAL_TEMPLATE.format(object=obj, style=style)


def listing() -> dict:
    return {"objects": list(OBJECTS), "styles": list(STYLES), "neighbor_groups": [list(g) for g in NEIGHBOR_GROUPS]}


def vocabulary() -> list[str]:
    """Every word that any MiniCanvas prompt can contain, in a fixed order."""
    words: list[str] = []
    texts = FULL_TEMPLATES + OBJECT_TEMPLATES + STYLE_TEMPLATES + OBJECTS + STYLES
    for text in texts:
        for word in text.replace("{object}", " ").replace("{style}", " ").split():
            if word not in words:
                words.append(word)
    return words
