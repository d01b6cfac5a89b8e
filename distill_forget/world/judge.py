"""The MiniCanvas judge: a small CNN with an object head and a style head.

Any judge the evaluation takes is a callable mapping uint8 images (N, 3, H, W) to a dict
{domain: scores (N, len(concepts))} and has `domains` = {domain: [concept names]}. This one
also exposes `features` (the penultimate layer) for the Frechet distance.
"""

from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill_forget.world.concepts import OBJECTS, STYLES

NUM_FEATURES = 128


class MiniCanvasJudge(nn.Module):
    domains: ClassVar[dict[str, list[str]]] = {"object": OBJECTS, "style": STYLES}

    def __init__(self):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.body = nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 96))  # 32 -> 4
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(96 * 4 * 4, NUM_FEATURES), nn.ReLU())
        self.heads = nn.ModuleDict({d: nn.Linear(NUM_FEATURES, len(c)) for d, c in self.domains.items()})

    @staticmethod
    def _prepare(images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        if images.shape[-1] != 32:
            images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.body(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {d: head(feats) for d, head in self.heads.items()}

    def save(self, path) -> None:
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path) -> "MiniCanvasJudge":
        judge = cls()
        try:
            judge.load_state_dict(load_file(str(path)))
        except Exception as err:  # a truncated or foreign file
            raise ValueError(f"cannot load the MiniCanvas judge from {path}: {err}") from err
        return judge.eval()


class JudgeFeatures(nn.Module):
    """The judge's feature layer as torchmetrics' FID feature extractor (uint8 in)."""

    num_features = NUM_FEATURES

    def __init__(self, judge: MiniCanvasJudge):
        super().__init__()
        self.judge = judge

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images)
