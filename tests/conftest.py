import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised MiniCanvas-architecture pipeline folder, saved with stock diffusers."""
    from distill_forget.world.model import assemble_pipeline, build_text_encoder, build_tokenizer, build_unet, build_vae

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    pipe = assemble_pipeline(build_unet(), build_vae(), build_text_encoder(len(tokenizer)), tokenizer)
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def teacher_dir(tiny_pipeline_dir, tmp_path):
    """A model that is no longer the base model: `tiny_pipeline_dir` with perturbed cross-attention."""
    from distill_forget.pipelines import load_pipeline

    teacher_pipe = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        for name, p in teacher_pipe.unet.named_parameters():
            if ".attn2." in name:
                p.add_(0.05)
    teacher_pipe.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


@pytest.fixture
def two_requests(tmp_path):
    """A request file forgetting a style, then an object."""
    path = tmp_path / "requests.yaml"
    path.write_text("requests:\n  - {concept: dots, kind: style}\n  - {concept: star, kind: object}\n")
    return path


@pytest.fixture
def random_judge(tmp_path):
    """A randomly initialised MiniCanvas judge file (seeded): the loop's plumbing, not its verdicts."""
    from distill_forget.world.judge import MiniCanvasJudge

    path = tmp_path / "judge.safetensors"
    torch.manual_seed(0)
    MiniCanvasJudge().eval().save(path)
    return path
