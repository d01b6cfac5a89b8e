"""Configs: OmegaConf YAML files in `configs/`, merged with `key=value` command-line overrides.

Every command of the project reads its defaults from one YAML file here and nowhere else.
"""

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR.parent / "configs"
MINICANVAS_DIR = PACKAGE_DIR / "assets" / "minicanvas"  # the shipped model and judge
CONCEPT_BANK = PACKAGE_DIR / "assets" / "concept_bank.yaml"  # candidate neighbours for real models
LOOP_SECTIONS = ("step", "evaluate")  # the commands the loop drives, mounted under their names in its config


def read_config(name: str) -> DictConfig:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found (is the repository checked out whole?)")
    return OmegaConf.load(path)


def read_defaults(name: str, sections: tuple[str, ...] = ()) -> DictConfig:
    """`configs/<name>.yaml` with each name in `sections` mounted under that key from `configs/<section>.yaml`."""
    base = read_config(name)
    for section in sections:
        base[section] = read_config(section)
    return base


def load_config(name: str, argv: list[str] | None = None, doc: str = "", sections: tuple[str, ...] = ()) -> DictConfig:
    """`configs/<name>.yaml` merged with `key=value` arguments; `--help` prints both and exits.

    Each name in `sections` mounts `configs/<section>.yaml` under that key (`step.lr=...`), so a
    command that drives another keeps that command's defaults in their one home. `config=FILE`
    (a YAML path, or a name under `configs/` such as `models/sd15`) merges a file of settings,
    e.g. a model's, over the defaults before the `key=value` arguments; it may set only known keys.
    """
    argv = sys.argv[1:] if argv is None else argv
    presets = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    argv = [a for a in argv if not a.startswith("config=")]
    path = CONFIG_DIR / f"{name}.yaml"
    base = read_defaults(name, sections)
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n")
        print(f"Settings (from {path}); override any with key=value:\n")
        print(OmegaConf.to_yaml(base))
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value (got {bad}); see --help")
    for preset in presets:
        preset_path = Path(preset) if Path(preset).is_file() else CONFIG_DIR / f"{preset}.yaml"
        if not preset_path.is_file():
            raise SystemExit(f"config={preset}: no such file (nor {preset_path})")
        settings = OmegaConf.load(preset_path)
        unknown = [k for k in _flat_keys(settings) if not _known(base, k)]
        if unknown:
            raise SystemExit(
                f"{preset_path}: unknown setting(s) {unknown}; see --help for the settings of this command"
            )
        base = OmegaConf.merge(base, settings)
    overrides = OmegaConf.from_dotlist(argv)
    unknown = [k for k in _flat_keys(overrides) if not _known(base, k)]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; see --help for the settings of this command")
    return OmegaConf.merge(base, overrides)


def _known(base: DictConfig, key: str) -> bool:
    """A setting of `base`, or a key inside a mapping of settings named `*_overrides`
    (`step.target.chain_overrides`), whose contents are checked where they are used."""
    if OmegaConf.select(base, key, default="__missing__") != "__missing__":
        return True
    parts = key.split(".")
    return any(part.endswith("_overrides") and isinstance(OmegaConf.select(base, ".".join(parts[: i + 1])), DictConfig)
               for i, part in enumerate(parts[:-1]))  # fmt: skip


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        keys += _flat_keys(value, full + ".") if isinstance(value, DictConfig) else [full]
    return keys


def resolve_model_dir(value: str | None) -> Path:
    """The pipeline folder a `model=` setting names; the shipped MiniCanvas model when empty."""
    path = Path(value) if value else MINICANVAS_DIR / "pipeline"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"model folder {path} is not a diffusers pipeline folder (no model_index.json)")
    return path
