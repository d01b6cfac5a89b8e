"""The MiniCanvas pipeline folder is a stock diffusers folder: it saves, reloads offline and generates."""

import json
import subprocess
import sys

import pytest

from distill_forget.config import MINICANVAS_DIR


def test_tiny_folder_reloads_offline_with_stock_diffusers(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a ring in neon style"], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from distill_forget.pipelines import load_pipeline

    with pytest.raises(FileNotFoundError, match=r"no model_index.json"):
        load_pipeline(tmp_path / "nowhere")


def test_shipped_model_loads_in_a_fresh_process_without_network():
    code = (
        "import sys, torch; from diffusers import StableDiffusionPipeline;"
        f"p = StableDiffusionPipeline.from_pretrained({str(MINICANVAS_DIR / 'pipeline')!r}, local_files_only=True);"
        "p.set_progress_bar_config(disable=True);"
        "im = p(['a star in dots style'], num_inference_steps=3, output_type='np',"
        " generator=torch.Generator().manual_seed(0)).images;"
        "print(im.shape)"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 32, 32, 3)" in out.stdout


def test_shipped_judge_is_accurate_on_held_out_renders():
    from distill_forget.world.build import HELD_OUT_SEED, judge_accuracy, to_tensor, to_uint8
    from distill_forget.world.judge import MiniCanvasJudge
    from distill_forget.world.render import grid_pairs, render_batch

    judge = MiniCanvasJudge.load(MINICANVAS_DIR / "judge.safetensors")
    pairs = grid_pairs(5)
    accuracy = judge_accuracy(judge, to_uint8(to_tensor(render_batch(pairs, seed=HELD_OUT_SEED))), pairs)
    assert accuracy["object"] >= 0.98 and accuracy["style"] >= 0.98, accuracy


def test_corrupt_judge_file_is_a_clear_error(tmp_path):
    from distill_forget.world.judge import MiniCanvasJudge

    bad = tmp_path / "judge.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load the MiniCanvas judge"):
        MiniCanvasJudge.load(bad)
