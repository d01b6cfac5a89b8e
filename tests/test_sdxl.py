"""SDXL pipeline folders: two text encoders, pooled `text_embeds` and `time_ids` through the step
and the loop, on a tiny randomly initialised SDXL built from configs (no download)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from distill_forget.config import load_config
from distill_forget.distill.module import TRAINABLE
from distill_forget.distill.networks import Condition, Denoiser, SDXLPromptEncoder, prompt_encoder
from distill_forget.distill.step import RECORD_FILE, run_step
from distill_forget.distill.targets import choose_neighbors
from distill_forget.ledger import Ledger, weights_hash
from distill_forget.pipelines import load_pipeline
from distill_forget.requests import Request
from distill_forget.train import main as train_main
from distill_forget.train import save_changed_weights
from distill_forget.world.model import MAX_TOKENS, build_tokenizer

WIDTHS = (32, 48)  # hidden sizes of the two text encoders: the UNet reads both, concatenated
PROJECTION = 24  # the second encoder's pooled projection (SDXL's `text_embeds`)
TIME_EMBED = 8  # per size number; SDXL has 6 of them
IMAGE = 16  # pixels: 8x8 latents through a VAE with one 2x downsampling

# SDXL base 1.0's scheduler settings.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)  # fmt: skip

FAST = [
    "world=none", "steps=2", "batch=2", "replay.bank_size=2", "sampling_steps=2", "score.latents=2",
    "accelerator=cpu", "lr=1e-2", "warmup=1", "retain.prompts=[a square in neon style,a circle in sketch style]",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Networks this small run ~10x faster on one thread than on two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_encoder_config(tokenizer, hidden_size: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        **extra,
    )  # fmt: skip


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=sum(WIDTHS),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    """A randomly initialised SDXL pipeline folder, saved with stock diffusers."""
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    save_tiny_sdxl(folder)
    return folder


def save_tiny_sdxl(folder) -> None:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE,
    )  # fmt: skip
    second = text_encoder_config(tokenizer, WIDTHS[1], projection_dim=PROJECTION)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_encoder_config(tokenizer, WIDTHS[0])),
        text_encoder_2=CLIPTextModelWithProjection(second),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipe.save_pretrained(folder)


def test_sdxl_condition_is_what_the_stock_pipeline_feeds_its_unet(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir)
    encoder = prompt_encoder(pipe)
    assert isinstance(encoder, SDXLPromptEncoder)
    prompts = ["a ring in dots style", "dots style", "a square"]
    condition = encoder(prompts)
    text, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((IMAGE, IMAGE), (0, 0), (IMAGE, IMAGE), text.dtype, PROJECTION)
    assert condition.text.shape == (3, MAX_TOKENS, sum(WIDTHS)) and torch.equal(condition.text, text)
    assert condition.pooled.shape == (3, PROJECTION) and torch.equal(condition.pooled, pooled)
    assert torch.equal(condition.time_ids, time_ids.repeat(3, 1))
    rows = condition[torch.tensor([2, 0])]
    assert len(rows) == 2 and torch.equal(rows.pooled[0], pooled[2]) and torch.equal(rows.text[1], text[0])

    torch.manual_seed(0)
    x_t, t = torch.randn(3, 4, IMAGE // 2, IMAGE // 2), torch.tensor([10, 500, 999])
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(3, 1)}
    stock = pipe.unet(x_t, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    denoiser = Denoiser(pipe.unet)
    assert denoiser.latent_shape == (4, IMAGE // 2, IMAGE // 2)
    assert torch.equal(denoiser(x_t, t, condition), stock)
    with pytest.raises(ValueError, match="needs the pooled text embedding and time_ids"):
        denoiser(x_t, t, Condition(condition.text))

    # Neighbours by text similarity use the only pooled embedding SDXL has: the second encoder's.
    pool = {"big dots": "big dots style", "stripes": "stripes style"}
    chosen, record = choose_neighbors("text", "dots style", pool, 1, [], encoder=encoder)
    reference = pipe.encode_prompt(["dots style", *pool.values()], device="cpu", do_classifier_free_guidance=False)[2]
    cosine = torch.nn.functional.cosine_similarity(reference[1:], reference[:1])
    assert record["cosine"] == {name: pytest.approx(float(c), abs=1e-6) for name, c in zip(pool, cosine)}
    assert chosen == [list(pool)[int(cosine.argmax())]]


def test_sdxl_step_trains_only_the_selected_group_and_saves_a_stock_folder(tiny_sdxl_dir, tmp_path):
    cfg = load_config("step", [*FAST, "trainable=cross_attention_kv", "target.mode=score"])
    teacher_hash = weights_hash(tiny_sdxl_dir)
    request = Request("dots", "style", prompts=["a ring in dots style", "dots style"], targets=["stripes", "mosaic"],
                      neighbors=["big dots"])  # fmt: skip
    earlier = Request("circle", "object", prompts=["a circle in neon style"])
    out = tmp_path / "student"
    record = run_step(tiny_sdxl_dir, request, cfg, out, forgotten_before=[earlier])

    assert weights_hash(tiny_sdxl_dir) == teacher_hash, "the teacher folder changed"
    assert record["steps"] == 2 and set(record["final_losses"]) >= {"forget", "retain", "neighbor", "forgotten"}
    assert all(torch.isfinite(torch.tensor(v)) for v in record["final_losses"].values())
    assert set(record["targets"]["counts"]) <= {"stripes", "mosaic"} and len(record["targets"]["distances"]) == 2
    assert json.loads((out / RECORD_FILE).read_text())["request"]["concept"] == "dots"

    index = json.loads((out / "model_index.json").read_text())
    assert index == json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
        assert (out / component).is_dir(), component
    for component in ("text_encoder", "text_encoder_2", "vae"):
        assert weights_hash(out / component) == weights_hash(tiny_sdxl_dir / component), component

    student = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    teacher = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    before = dict(teacher.unet.named_parameters())
    changed = {n for n, p in student.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the student UNet did not change"
    assert all(TRAINABLE["cross_attention_kv"](n) for n in changed), sorted(changed)
    generator = torch.Generator().manual_seed(0)
    image = student("a ring in dots style", num_inference_steps=2, generator=generator, output_type="np").images
    assert image.shape == (1, IMAGE, IMAGE, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_sdxl_loop_runs_two_requests_and_its_ledger_verifies(tiny_sdxl_dir, tmp_path, capsys):
    requests = tmp_path / "requests.yaml"
    requests.write_text(
        "requests:\n"
        "  - {concept: dots, kind: style, prompts: [a ring in dots style, dots style], neighbors: [big dots]}\n"
        "  - {concept: star, kind: object, prompts: [a star in neon style, a star]}\n"
    )
    run_dir = tmp_path / "run"
    args = [f"model={tiny_sdxl_dir}", f"requests={requests}", f"run_dir={run_dir}", "evaluate_every_step=false",
            "threads=1", "wandb.mode=disabled", *(f"step.{setting}" for setting in FAST)]  # fmt: skip
    train_main(args)

    ledger = Ledger(run_dir / "ledger.jsonl")
    records = ledger.verify()
    assert [r["request"]["concept"] for r in records] == ["dots", "star"]
    assert records[0]["input_hash"] == weights_hash(tiny_sdxl_dir)
    assert records[1]["input_hash"] == records[0]["output_hash"]
    for i, name in enumerate(["01-dots", "02-star"], start=1):
        folder = run_dir / "steps" / name
        ledger.verify_weights(i, folder / "pipeline")
        changed = load_file(folder / "changed_weights.safetensors")
        assert len(changed) == records[i - 1]["changed_tensors"] > 0
        assert all(TRAINABLE["cross_attention"](n) for n in changed), sorted(changed)
    StableDiffusionXLPipeline.from_pretrained(run_dir / "steps" / "02-star" / "pipeline", local_files_only=True)

    capsys.readouterr()
    train_main(args)  # rerun: nothing redone, the saved weights checked against the ledger
    out = capsys.readouterr().out
    assert "'dots': done before, weights verified" in out and "'star': done before, weights verified" in out


def test_changed_weights_are_found_in_a_sharded_unet(tmp_path):
    """diffusers shards a UNet over 10 GB (SDXL's in float32); the changed tensors are still found."""
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    unet.save_pretrained(tmp_path / "teacher" / "unet", max_shard_size="200KB")
    assert (tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with torch.no_grad():
        unet.get_parameter(name).add_(1.0)
    unet.save_pretrained(tmp_path / "student" / "unet")
    count = save_changed_weights(tmp_path / "teacher", tmp_path / "student", tmp_path / "changed.safetensors")
    changed = load_file(tmp_path / "changed.safetensors")
    assert count == 1 and list(changed) == [name] and torch.equal(changed[name], unet.get_parameter(name))
