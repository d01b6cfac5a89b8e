"""The networks of a step as the losses call them: eps(M, x_t, t, c), and prompts -> c."""

import torch


class Denoiser:
    """A UNet called as `eps(x_t, t, text_embeds)`; counts per-sample network evaluations.

    A plain object, not an nn.Module: wrapping the frozen teacher in it keeps the teacher out
    of the student module's parameters, optimizer and checkpoints.
    """

    def __init__(self, unet):
        self.unet = unet
        self.evaluations = 0  # samples through the network, for cost reports

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        self.evaluations += x_t.shape[0]
        return self.unet(x_t, t, encoder_hidden_states=text_embeds).sample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)


class PromptEncoder:
    """The frozen tokenizer + text encoder: prompts -> the UNet's text condition."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(N, tokens, width): what the UNet's cross-attention reads."""
        return self.text_encoder(self._ids(prompts))[0]

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """(N, width): the text encoder's pooled embedding, for cosine similarity."""
        return self.text_encoder(self._ids(prompts)).pooler_output
