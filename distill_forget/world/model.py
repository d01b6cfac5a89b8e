"""The MiniCanvas text-to-image model: a standard Stable Diffusion v1.x pipeline folder, small.

Stock classes only (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a word-level
PreTrainedTokenizerFast, DDIMScheduler), so the trainer takes exactly the code path of a
real SD v1.x folder and stock `StableDiffusionPipeline.from_pretrained(folder)` loads it.
"""

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from distill_forget.world.concepts import vocabulary

MAX_TOKENS = 16
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# Stable Diffusion's noise schedule, unchanged.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_tokenizer(words=None, max_tokens: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (default: the world's vocabulary), built without any download."""
    words = vocabulary() if words is None else [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_tokens,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    # Frozen at its seeded initialisation during training, as SD freezes CLIP: random token
    # embeddings in 256 dimensions keep every concept on its own direction. A 64-wide encoder
    # trained with the UNet packed the 12 objects into ~4 directions (`star` anti-parallel to
    # `circle`), so no cross-attention edit could move one object without dragging others.
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    # Cross-attention at 8x8 and 4x4 only: attention at 16x16 costs 4-10x more on a CPU.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_vae() -> AutoencoderKL:
    # One 2x downsampling: 32x32x3 -> 16x16x4. A 4x VAE erased the styles' textures.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler.from_config(SCHEDULER_CONFIG)


def assemble_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
