"""Loading diffusers pipeline folders: the one place the project opens a model folder."""

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name for a model's weights


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


def unet_weight_files(folder) -> list[Path]:
    """The safetensors files of a pipeline folder's UNet: one file, or the shards its index
    lists (diffusers shards a model over 10 GB, as SDXL's UNet is in float32)."""
    unet = Path(folder) / "unet"
    index = unet / f"{UNET_WEIGHTS}.index.json"
    if index.is_file():
        return [unet / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (unet / UNET_WEIGHTS).is_file():
        return [unet / UNET_WEIGHTS]
    raise FileNotFoundError(f"{unet} holds neither {UNET_WEIGHTS} nor its shard index {index.name}")
