"""Loading diffusers pipeline folders: the one place the project opens a model folder."""

from pathlib import Path

import torch
from diffusers import DiffusionPipeline


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_pipeline(folder, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """A stock diffusers pipeline from a local folder; never touches the network."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ValueError(f"cannot load the pipeline folder {folder}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
