"""Speed and memory of one request at real Stable Diffusion scale, without downloading a model.

    python -m distill_forget.full_size --family sd15|sd21|sdxl --work DIR [--steps N] [KEY=VALUE ...]

No weights can be downloaded here, so the pipeline folder is built from the published
architectures (UNet, text encoders, VAE, scheduler of SD v1.5, v2.1 or SDXL base 1.0) with random
weights and saved with stock diffusers. The request then runs through the same command a user
runs, `python -m distill_forget.train config=models/FAMILY model=FOLDER ...`, for the first
request of the family's example file, and the step's record gives the figures: seconds of
planning, replay-bank sampling and training, peak GPU memory. Random weights change no cost:
every operation has the shapes of the real model.

The tokenizer is the only part that is not the real one (CLIP's BPE files are a download): a
word-level tokenizer over the words of the requests and the concept bank, padded to CLIP's 77
tokens. KEY=VALUE arguments are passed on to the train command (e.g. step.batch=6).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from distill_forget.config import CONCEPT_BANK, CONFIG_DIR
from distill_forget.distill.step import RECORD_FILE
from distill_forget.requests import load_requests
from distill_forget.storage import atomic_dir, write_json
from distill_forget.world.model import build_tokenizer

CLIP_TOKENS = 77
CLIP_VOCAB = 49408
EXAMPLE_REQUESTS = {"sd15": "sd-example.yaml", "sd21": "sd-example.yaml", "sdxl": "sdxl-example.yaml"}

# The published architectures (each model's config.json), as constructor arguments.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # fmt: skip  # SD v1.x; SDXL's first encoder
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)  # fmt: skip  # SD v2.x (the penultimate of 24 layers)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)  # fmt: skip  # SDXL's second encoder
UNETS = {
    # UNet2DConditionModel's defaults are SD v1.x's layout: 4 levels (320-1280), attention at 3.
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}  # fmt: skip
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2)  # fmt: skip
IMAGE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
VAE_SCALING = {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)  # fmt: skip
FAMILIES = tuple(UNETS)

# Parameter counts of the published checkpoints, for the test of these architectures.
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd21": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
}


def text_encoder(tokenizer, architecture: dict, with_projection=False):
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_TOKENS,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **architecture)  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_networks(family: str, tokenizer) -> dict:
    """The UNet, VAE and text encoder(s) of `family`, randomly initialised (under
    `torch.device('meta')`, shapes only: what the parameter-count test builds)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)} (got {family!r})")
    networks = {
        "unet": UNet2DConditionModel(**UNETS[family]),
        "vae": AutoencoderKL(sample_size=IMAGE_SIZE[family], scaling_factor=VAE_SCALING[family], **VAE),
        "text_encoder": text_encoder(tokenizer, OPENCLIP_H if family == "sd21" else CLIP_L),
    }
    if family == "sdxl":
        networks["text_encoder_2"] = text_encoder(tokenizer, OPENCLIP_BIGG, with_projection=True)
    return networks


def build_pipeline(family: str, words=()):
    """A stock diffusers pipeline of `family` with random weights; its tokenizer knows `words`."""
    tokenizer = build_tokenizer(words, max_tokens=CLIP_TOKENS)
    networks = build_networks(family, tokenizer)
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading", interpolation_type="linear")
        return StableDiffusionXLPipeline(**networks, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)
    prediction = "v_prediction" if family == "sd21" else "epsilon"
    scheduler = DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction)
    return StableDiffusionPipeline(**networks, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def request_words(requests_file: Path) -> list[str]:
    """Every word of a request file and of the shipped concept bank (neighbour candidates)."""
    text = json.dumps([yaml.safe_load(requests_file.read_text()), yaml.safe_load(CONCEPT_BANK.read_text())])
    return sorted(set("".join(c if c.isalnum() else " " for c in text.lower()).split()))


def save_random_pipeline(family: str, folder: Path, requests_file: Path) -> float:
    """Build and save the pipeline folder (reused when already there); the seconds it took."""
    if (folder / "model_index.json").is_file():
        return 0.0
    started = time.time()
    torch.manual_seed(0)
    pipe = build_pipeline(family, request_words(requests_file))
    with atomic_dir(folder) as partial:
        pipe.save_pretrained(partial)
    return time.time() - started


def measure(model_dir: Path, config: str, requests_file: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Run the train command on the first request of `requests_file`; the step's figures."""
    from distill_forget.train import main as train_main  # imported late: `--help` stays quick

    one_request = run_dir.with_name(run_dir.name + "-request.yaml")
    one_request.write_text(yaml.safe_dump({"requests": [load_requests(requests_file)[0].to_dict()]}))
    started = time.time()
    train_main([f"config={config}", f"model={model_dir}", f"requests={one_request}", f"run_dir={run_dir}",
                "wandb.mode=disabled", *overrides])  # fmt: skip
    seconds = time.time() - started
    (record_path,) = run_dir.glob(f"steps/*/pipeline/{RECORD_FILE}")
    record = json.loads(record_path.read_text())
    settings = record["settings"]
    steps = record["steps"]
    return {
        "model": str(model_dir),
        "config": config,
        "optimizer_steps": steps,
        "global_batch": settings["batch"],
        "accumulate": settings["accumulate"],
        "precision": settings["precision"],
        "trainable": settings["trainable"],
        "replay_bank_size": settings["replay"]["bank_size"],  # latents per prompt group
        "seconds": record["seconds"],
        "seconds_per_optimizer_step": round(record["seconds"]["training"] / max(steps, 1), 3),
        "seconds_whole_request": round(seconds, 1),  # with loading, saving the student, hashing, the ledger
        "evaluations": record["evaluations"],
        "peak_memory_mb": record["peak_memory_mb"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the pipeline, the run and the figures")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (the configs' 300 scale linearly)")
    parser.add_argument("--keep", action="store_true", help="keep the pipeline folders (SDXL: ~14 GB each)")
    args, overrides = parser.parse_known_args(argv)
    requests_file = CONFIG_DIR / "requests" / EXAMPLE_REQUESTS[args.family]
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"{args.family}-random"
    print(f"[full-size] building {args.family} from its published architecture (random weights)", flush=True)
    built = save_random_pipeline(args.family, model_dir, requests_file)
    run_dir = args.work / f"run-{args.family}"
    shutil.rmtree(run_dir, ignore_errors=True)
    figures = {"family": args.family, "seconds_building": round(built, 1),
               **measure(model_dir, f"models/{args.family}", requests_file, run_dir,
                         [f"step.steps={args.steps}", *overrides])}  # fmt: skip
    write_json(args.work / f"{args.family}.json", figures)
    print(json.dumps(figures, indent=1), flush=True)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
