"""Unlearning requests: the YAML file that lists, in order, the concepts to forget.

    requests:
      - concept: dots
        kind: style
        targets: [stripes, mosaic]     # or `target: stripes`; candidates for the mapped prompts
        neighbors: [big dots]          # concepts to protect most
        prompts: ["a circle in dots style"]
        overrides: {steps: 300, lambda_f: 6.0}   # step settings for this request only

Every error names the file, the request (1-based, with its concept when known) and the field,
so a long request file is fixed in one pass.
"""

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from distill_forget.world import concepts

KINDS = ("object", "style", "person", "other")
FIELDS = ("concept", "kind", "prompts", "target", "targets", "neighbors", "overrides")


class RequestFileError(ValueError):
    """A request file that cannot be used as written."""


class _RequestFileLoader(yaml.SafeLoader):
    """YAML as the configs read it: `1e-5` is a number (PyYAML's YAML 1.1 reads it as a string
    and wants `1.0e-5`; OmegaConf, which reads configs/ and the command line, takes both)."""


_RequestFileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class Request:
    concept: str
    kind: str
    prompts: list[str] = field(default_factory=list)  # empty: built from the world's templates
    targets: list[str] = field(default_factory=list)  # candidate replacements; "" removes the concept
    neighbors: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # step settings merged over configs/step.yaml
    where: str = field(default="", compare=False)  # "requests.yaml: request 2 ('dots')", for messages

    def to_dict(self) -> dict:
        record = asdict(self)
        record.pop("where")
        return record


def load_requests(path, settings: DictConfig | None = None) -> list[Request]:
    """The requests of a YAML file, validated; with `settings`, override keys are checked too."""
    path = Path(path)
    if not path.is_file():
        raise RequestFileError(f"request file {path} not found")
    try:
        data = yaml.load(path.read_text(), Loader=_RequestFileLoader)
    except yaml.YAMLError as err:
        raise RequestFileError(f"{path.name}: not valid YAML: {err}") from err
    return parse_requests(data, path.name, settings)


def parse_requests(data, source: str = "requests", settings: DictConfig | None = None) -> list[Request]:
    if not isinstance(data, dict) or "requests" not in data:
        raise RequestFileError(f"{source}: expected a mapping with a 'requests' list at the top level")
    entries = data["requests"]
    if not isinstance(entries, list) or not entries:
        raise RequestFileError(f"{source}: 'requests' must be a non-empty list (got {type(entries).__name__})")
    requests, seen = [], {}
    for number, entry in enumerate(entries, start=1):
        request = _parse_one(entry, f"{source}: request {number}")
        if request.concept in seen:
            raise RequestFileError(
                f"{request.where}: field 'concept': {request.concept!r} is already request {seen[request.concept]}"
            )
        seen[request.concept] = number
        if settings is not None:
            merge_overrides(settings, request)
        requests.append(request)
    return requests


def _parse_one(entry, where: str) -> Request:
    if not isinstance(entry, dict):
        raise RequestFileError(f"{where}: must be a mapping with 'concept' and 'kind' (got {type(entry).__name__})")
    concept = entry.get("concept")
    if isinstance(concept, str) and concept.strip():
        where = f"{where} ({concept!r})"

    def fail(name: str, message: str):
        raise RequestFileError(f"{where}: field '{name}' {message}")

    unknown = [k for k in entry if k not in FIELDS]
    if unknown:
        fail(str(unknown[0]), f"is not a request field (known: {', '.join(FIELDS)})")
    if concept is None:
        fail("concept", "is required")
    if not isinstance(concept, str) or not concept.strip():
        fail("concept", f"must be a non-empty string (got {concept!r})")
    kind = entry.get("kind")
    if kind is None:
        fail("kind", f"is required (one of {', '.join(KINDS)})")
    if kind not in KINDS:
        fail("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    if "target" in entry and "targets" in entry:
        fail("target", "and 'targets' cannot both be given; list every candidate under 'targets'")

    def strings(name: str, allow_empty_strings: bool = False) -> list[str]:
        value = entry.get(name, [])
        if not isinstance(value, list):
            fail(name, f"must be a list of strings (got {type(value).__name__})")
        for item in value:
            if not isinstance(item, str) or (not allow_empty_strings and not item.strip()):
                fail(name, f"must be a list of non-empty strings (got item {item!r})")
        return list(value)

    prompts = strings("prompts")
    for prompt in prompts:
        if not mentions(prompt, concept):
            fail("prompts", f"item {prompt!r} does not mention the concept {concept!r} (its mapped prompt replaces it)")
    if "target" in entry:
        if not isinstance(entry["target"], str):
            fail("target", f"must be a string (got {type(entry['target']).__name__}); \"\" removes the concept")
        targets = [entry["target"]]
    else:
        targets = strings("targets", allow_empty_strings=True)
    if concept in targets:
        fail("targets", f"cannot contain the concept {concept!r} itself")
    neighbors = strings("neighbors")
    if concept in neighbors:
        fail("neighbors", f"cannot contain the concept {concept!r} itself")
    overrides = entry.get("overrides", {})
    if not isinstance(overrides, dict):
        fail("overrides", f"must be a mapping of step settings (got {type(overrides).__name__})")
    return Request(concept, kind, prompts, targets, neighbors, dict(overrides), where)


def merge_overrides(settings: DictConfig, request: Request) -> DictConfig:
    """`settings` with the request's overrides merged in; unknown setting names are errors."""
    where = request.where or repr(request.concept)
    return merge_settings(settings, request.overrides, f"{where}: field 'overrides'", RequestFileError)


def merge_settings(settings: DictConfig, overrides: dict, where: str, error=ValueError) -> DictConfig:
    """`settings` with `overrides` (nested step settings) merged in; an unknown name raises `error`."""
    merged = copy.deepcopy(settings)
    for key, value in flat_items(overrides):
        default = OmegaConf.select(settings, key, default="__missing__")
        if default == "__missing__":
            raise error(f"{where}: {key!r} is not a step setting (see configs/step.yaml)")
        if is_number(default) and not (value is None or is_number(value)):
            raise error(f"{where}: {key!r} must be a number (it is {default!r} by default), not {value!r}")
        OmegaConf.update(merged, key, value, merge=True)
    return merged


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flat_items(mapping: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def mentions(prompt: str, concept: str) -> bool:
    return concept_pattern(concept).search(prompt) is not None


def concept_pattern(concept: str) -> re.Pattern:
    # Whole words only ("dots" is not in "polkadots"); case-insensitive like the tokenizers.
    return re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)


# ---------------------------------------------------------------- MiniCanvas


def check_minicanvas(requests: list[Request]) -> None:
    """Every concept, neighbour and word of a request exists in the MiniCanvas world."""
    known_words = set(concepts.vocabulary())
    for request in requests:
        where = request.where or repr(request.concept)
        try:
            kind = concepts.kind_of(request.concept)
        except KeyError as err:
            raise RequestFileError(f"{where}: field 'concept': {err.args[0]}") from None
        if request.kind != kind:
            raise RequestFileError(f"{where}: field 'kind' must be {kind!r} for the MiniCanvas {request.concept!r}")
        for name in request.neighbors:
            try:
                concepts.kind_of(name)
            except KeyError as err:
                raise RequestFileError(f"{where}: field 'neighbors': {err.args[0]}") from None
        # The world's tokenizer knows only its own words; others would silently become <unk>.
        for field_name, texts in (("targets", request.targets), ("prompts", request.prompts)):
            for text in texts:
                unknown = [w for w in re.findall(r"\w+|[^\w\s]", text.lower()) if w not in known_words]
                if unknown:
                    raise RequestFileError(
                        f"{where}: field '{field_name}': {text!r} uses words MiniCanvas does not know: {unknown}"
                    )
