"""Train the embedded MiniCanvas model (VAE, UNet; the text encoder is frozen) and its judge from scratch.

    python -m distill_forget.world.build [out=DIR] [stage=all|vae|judge|unet] [key=value ...]

Seeded and resumable: each finished stage is kept in the work folder, and the UNet stage
checkpoints every few hundred steps, so rerunning the same command continues where a
killed run stopped. The result is a stock diffusers pipeline folder `<out>/pipeline` and
the judge `<out>/judge.safetensors`.
"""

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill_forget.config import MINICANVAS_DIR, load_config
from distill_forget.storage import atomic_dir, torch_load, torch_save, write_json
from distill_forget.world import concepts
from distill_forget.world.judge import MiniCanvasJudge
from distill_forget.world.model import (
    MAX_TOKENS,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    training_scheduler,
)
from distill_forget.world.render import grid_pairs, render_batch

HELD_OUT_SEED = 7  # renders never used for training: the judge's test set


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def random_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    objs = rng.integers(len(concepts.OBJECTS), size=n)
    styles = rng.integers(len(concepts.STYLES), size=n)
    return [(concepts.OBJECTS[o], concepts.STYLES[s]) for o, s in zip(objs, styles)]


class Progress:
    def __init__(self, name: str, total: int, start: int = 0, every: int = 50):
        self.name, self.total, self.start, self.every = name, total, start, every
        self.t0 = time.time()

    def update(self, step: int, **values) -> None:
        if step % self.every and step != self.total:
            return
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(
            f"[{self.name}] step {step}/{self.total} {shown} ({rate:.2f} steps/s, eta {eta / 60:.1f} min)", flush=True
        )


# ---------------------------------------------------------------- VAE


def train_vae(cfg, work: Path):
    done = work / "vae.pt"
    vae = build_vae()
    if done.exists():
        vae.load_state_dict(torch_load(done, "VAE stage result")["model"])
        return vae.eval()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr)
    progress = Progress("vae", cfg.vae.steps)
    for step in range(1, cfg.vae.steps + 1):
        images = to_tensor(render_batch(random_pairs(rng, cfg.vae.batch), seed=10_000 + step))
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        loss = rec_loss + cfg.vae.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = cfg.vae.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae.steps))
        progress.update(step, recon=rec_loss.item())
    vae.eval()
    with torch.no_grad():  # SD convention: latents scaled to unit variance
        latents = vae.encode(to_tensor(render_batch(grid_pairs(4), seed=3))).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    torch_save({"model": vae.state_dict(), "scaling_factor": vae.config.scaling_factor}, done)
    return vae


def load_vae_result(work: Path):
    state = torch_load(work / "vae.pt", "VAE stage result")
    vae = build_vae()
    vae.load_state_dict(state["model"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = [vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample for i in range(0, len(images), batch)]
    return torch.cat(out)


# ---------------------------------------------------------------- judge


@torch.no_grad()
def judge_accuracy(judge, images_uint8: torch.Tensor, pairs) -> dict[str, float]:
    judge.eval()
    scores = {d: [] for d in judge.domains}
    for i in range(0, len(images_uint8), 512):
        for d, s in judge(images_uint8[i : i + 512]).items():
            scores[d].append(s.argmax(-1))
    result = {}
    for d, names in judge.domains.items():
        truth = torch.tensor([names.index(p[0] if d == "object" else p[1]) for p in pairs])
        result[d] = float((torch.cat(scores[d]) == truth).float().mean())
    return result


def train_judge(cfg, work: Path, vae):
    done = work / "judge.pt"
    judge = MiniCanvasJudge()
    if done.exists():
        state = torch_load(done, "judge stage result")
        judge.load_state_dict(state["model"])
        return judge.eval(), state["figures"]
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.judge.lr, weight_decay=1e-4)
    progress = Progress("judge", cfg.judge.steps)
    n_recon = int(cfg.judge.batch * cfg.judge.reconstructed_share)
    for step in range(1, cfg.judge.steps + 1):
        judge.train()
        pairs = random_pairs(rng, cfg.judge.batch)
        images = to_tensor(render_batch(pairs, seed=20_000 + step))
        if n_recon:
            images[:n_recon] = reconstruct(vae, images[:n_recon])
        logits = judge(to_uint8(images))
        obj_t = torch.tensor([concepts.OBJECTS.index(o) for o, _ in pairs])
        sty_t = torch.tensor([concepts.STYLES.index(s) for _, s in pairs])
        loss = F.cross_entropy(logits["object"], obj_t) + F.cross_entropy(logits["style"], sty_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = cfg.judge.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.judge.steps))
        progress.update(step, loss=loss.item())
    judge.eval()
    pairs = grid_pairs(cfg.judge.held_out_repeats)
    held_out = to_tensor(render_batch(pairs, seed=HELD_OUT_SEED))
    figures = {
        "held_out_renders": judge_accuracy(judge, to_uint8(held_out), pairs),
        "vae_reconstructions": judge_accuracy(judge, to_uint8(reconstruct(vae, held_out)), pairs),
        "held_out_images": len(pairs),
    }
    print(f"[judge] accuracy {figures}", flush=True)
    torch_save({"model": judge.state_dict(), "figures": figures}, done)
    return judge, figures


# ---------------------------------------------------------------- UNet (text encoder frozen)


def training_prompt(rng: np.random.Generator, obj: str, style: str, ucfg) -> str:
    u = rng.random()
    if u < ucfg.empty:
        return ""
    if u < ucfg.empty + ucfg.object_only:
        return rng.choice(concepts.OBJECT_TEMPLATES).format(object=obj)
    if u < ucfg.empty + ucfg.object_only + ucfg.style_only:
        return rng.choice(concepts.STYLE_TEMPLATES).format(style=style)
    return rng.choice(concepts.FULL_TEMPLATES).format(object=obj, style=style)


def cached_latents(cfg, work: Path, vae):
    path = work / "latents.pt"
    if path.exists():
        return torch_load(path, "latent cache")
    pairs = grid_pairs(cfg.unet.renders_per_pair)
    latents = []
    with torch.no_grad():
        for i in range(0, len(pairs), 512):
            images = to_tensor(render_batch(pairs[i : i + 512], seed=30_000 + i))
            latents.append(vae.encode(images).latent_dist.mean * vae.config.scaling_factor)
            print(f"[latents] {i + len(images)}/{len(pairs)}", flush=True)
    cache = {"latents": torch.cat(latents), "pairs": pairs}
    torch_save(cache, path)
    return cache


def train_unet(cfg, work: Path, vae, tokenizer):
    """Train the UNet; the text encoder stays frozen at its seeded initialisation."""
    ucfg = cfg.unet
    cache = cached_latents(cfg, work, vae)
    latents, pairs = cache["latents"], cache["pairs"]
    torch.manual_seed(cfg.seed)
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer)).requires_grad_(False).eval()
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=ucfg.lr, weight_decay=1e-2)
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    step = 0
    ckpt_path = work / "unet_checkpoint.pt"
    if ckpt_path.exists():
        state = torch_load(ckpt_path, "UNet checkpoint")
        for module, key in [(unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet")]:
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"[unet] resuming from step {step}", flush=True)
    progress = Progress("unet", ucfg.steps, start=step)
    while step < ucfg.steps:
        step += 1
        rng = np.random.default_rng([cfg.seed, 3, step])  # per-step streams: resume is exact
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.from_numpy(rng.integers(len(latents), size=ucfg.batch))
        z0 = latents[idx]
        prompts = [training_prompt(rng, *pairs[i], ucfg) for i in idx.tolist()]
        ids = tokenizer(
            prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            text = text_encoder(ids)[0]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
        x_t = scheduler.add_noise(z0, noise, t)
        pred = unet(x_t, t, text).sample
        weight = torch.clamp(snr[t], max=ucfg.min_snr_gamma) / snr[t]  # min-SNR weighting
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr_scale = min(1.0, step / ucfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / ucfg.steps))
        for group in opt.param_groups:
            group["lr"] = ucfg.lr * lr_scale
        opt.step()
        with torch.no_grad():
            decay = min(ucfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema_unet.parameters()), params, 1 - decay)
        progress.update(step, loss=loss.item())
        if step % ucfg.checkpoint_every == 0 or step == ucfg.steps:
            torch_save(
                {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                 "opt": opt.state_dict(), "step": step},
                ckpt_path,
            )  # fmt: skip
    return ema_unet.eval(), text_encoder


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    cfg = load_config("world", argv, __doc__)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else MINICANVAS_DIR
    work = Path(cfg.work_dir) if cfg.work_dir else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages = ["vae", "judge", "unet"] if cfg.stage == "all" else [cfg.stage]
    vae = train_vae(cfg, work) if "vae" in stages else load_vae_result(work)
    if (work / "vae.pt").exists():
        vae = load_vae_result(work)
    figures = {}
    if "judge" in stages:
        judge, figures = train_judge(cfg, work, vae)
        out.mkdir(parents=True, exist_ok=True)
        judge.save(out / "judge.safetensors")
    if "unet" in stages:
        tokenizer = build_tokenizer()
        unet, text_encoder = train_unet(cfg, work, vae, tokenizer)
        pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
        with atomic_dir(out / "pipeline") as tmp:
            pipe.save_pretrained(tmp)
    write_json(out / "build.json", {"stages": stages, "seconds": round(time.time() - t0, 1), "judge": figures})
    print(f"done in {(time.time() - t0) / 60:.1f} min; model and judge in {out}", flush=True)


if __name__ == "__main__":
    main()
