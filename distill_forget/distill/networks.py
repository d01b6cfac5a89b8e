"""The networks of a step as the losses call them: eps(M, x_t, t, c), and prompts -> c.

The condition `c` is a `Condition`: the text states the UNet's cross-attention reads and, for
SDXL, the pooled text embedding and size conditioning (`time_ids`) it adds to the timestep
embedding. `prompt_encoder(pipe)` picks the encoder that produces it from the pipeline's
components: one text encoder (SD v1.x / v2.x) or two (SDXL).
"""

from dataclasses import dataclass, fields

import torch


@dataclass(eq=False)
class Condition:
    """The UNet's condition for a batch of prompts; indexes, slices and moves like a tensor.

    text: (N, tokens, width) cross-attention states. pooled: (N, width') pooled text embedding
    (SD v1/v2: the encoder's pooler output, used only to compare prompts; SDXL: the second
    encoder's projection, which the UNet reads as `text_embeds`). time_ids: (N, 6) SDXL size
    conditioning (original size, crop top-left, target size); None for SD v1/v2.
    """

    text: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn) -> "Condition":
        """`fn` applied to every tensor held (rows stay aligned across the fields)."""
        values = (getattr(self, field.name) for field in fields(self))
        return Condition(*(None if value is None else fn(value) for value in values))

    def __getitem__(self, index) -> "Condition":
        return self.map(lambda tensor: tensor[index])

    def __len__(self) -> int:
        return len(self.text)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to(self, device) -> "Condition":
        return self.map(lambda tensor: tensor.to(device))

    @staticmethod
    def cat(conditions: list["Condition"]) -> "Condition":
        """The rows of several conditions, in order."""
        columns = ([getattr(c, field.name) for c in conditions] for field in fields(Condition))
        return Condition(*(None if column[0] is None else torch.cat(column) for column in columns))

    def repeat_interleave(self, repeats: int) -> "Condition":
        return self.map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    @property
    def device(self) -> torch.device:
        return self.text.device


class Denoiser:
    """A UNet called as `eps(x_t, t, c)`, c a `Condition`; counts per-sample network evaluations.

    A plain object, not an nn.Module: wrapping the frozen teacher in it keeps the teacher out
    of the student module's parameters, optimizer and checkpoints.

    `autocast` (the frozen teacher's): a mixed-precision dtype its calls run under wherever they
    are made, so that its work outside the training step (planning, replay sampling) runs at the
    training's precision too; outputs are then returned in float32.
    """

    def __init__(self, unet, autocast: torch.dtype | None = None):
        self.unet = unet
        self.autocast = autocast
        self.evaluations = 0  # samples through the network, for cost reports

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        if self.autocast is None:  # no context: inside the training step, Lightning's autocast applies
            return self.predict(x_t, t, condition)
        with torch.autocast(x_t.device.type, dtype=self.autocast):
            return self.predict(x_t, t, condition).float()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        self.evaluations += x_t.shape[0]
        added = None
        if self.unet.config.addition_embed_type == "text_time":  # SDXL
            if condition.pooled is None or condition.time_ids is None:
                raise ValueError(
                    "this UNet (SDXL) needs the pooled text embedding and time_ids in its condition; "
                    "encode prompts with prompt_encoder(pipe), which reads both text encoders"
                )
            added = {"text_embeds": condition.pooled, "time_ids": condition.time_ids}
        return self.unet(x_t, t, encoder_hidden_states=condition.text, added_cond_kwargs=added).sample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.unet.config
        size = config.sample_size
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        return (config.in_channels, height, width)


class Blend:
    """A frozen answer part-way from the teacher's to the base model's: `T + share (M_0 - T)`.

    Both networks run on the same rows; `evaluations` counts the base model's only (the
    teacher counts its own). `share` 1 is the base model's answer itself.
    """

    def __init__(self, teacher: Denoiser, base: Denoiser, share: float):
        self.teacher, self.base, self.share = teacher, base, share

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        teacher_answer = self.teacher(x_t, t, condition)
        return teacher_answer + self.share * (self.base(x_t, t, condition) - teacher_answer)

    @property
    def evaluations(self) -> int:
        return self.base.evaluations


class PromptEncoder:
    """SD v1.x / v2.x's frozen tokenizer + text encoder: prompts -> the UNet's condition."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Condition:
        """The last hidden states (what SD's cross-attention reads) and the pooled embedding."""
        out = self.text_encoder(token_ids(self.tokenizer, prompts, self.text_encoder.device))
        return Condition(out.last_hidden_state, out.pooler_output)


class SDXLPromptEncoder(PromptEncoder):
    """SDXL's two frozen tokenizers + text encoders: prompts -> the UNet's condition (a
    PromptEncoder by what it does; it shares no state with the one-encoder version).

    As `StableDiffusionXLPipeline.encode_prompt` (no clip skip): the penultimate hidden states
    of both encoders, concatenated; the pooled projection of the second (`text_embeds`); and
    `time_ids` = (original size, crop top-left, target size) = (H, W, 0, 0, H, W), the size
    the pipeline generates at by default.
    """

    def __init__(self, tokenizers, text_encoders, image_size: tuple[int, int]):
        self.tokenizers = list(tokenizers)
        self.text_encoders = [encoder.requires_grad_(False).eval() for encoder in text_encoders]
        height, width = image_size
        self.size_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Condition:
        states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        text = torch.cat(states, dim=-1)
        time_ids = self.size_ids.to(text.device, text.dtype).repeat(len(text), 1)
        return Condition(text, out.text_embeds, time_ids)


def token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """(N, max length) token ids, padded and truncated as the diffusers pipelines do."""
    length = tokenizer.model_max_length
    tokens = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return tokens.input_ids.to(device)


def tokens_and_end(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, max length) token ids on the CPU, and each prompt's end-token position (N, 1): the tokens
    before it are the prompt's words, those after it padding."""
    ids = token_ids(tokenizer, prompts, "cpu")
    return ids, (ids == tokenizer.eos_token_id).int().argmax(1, keepdim=True)


def prompt_encoder(pipe, device="cpu") -> PromptEncoder:
    """The prompt encoder for a pipeline's components, its text encoders moved to `device`."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return PromptEncoder(pipe.tokenizer, pipe.text_encoder.to(device))
    if pipe.text_encoder is None:
        raise ValueError("SDXL folders without the first text encoder (the refiner) are not supported")
    image_size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    encoders = [pipe.text_encoder.to(device), pipe.text_encoder_2.to(device)]
    return SDXLPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], encoders, image_size)
