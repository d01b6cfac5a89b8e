"""Add-on regularisers that act on gradients and weights, not on the loss (METHODS.md).

    SelectiveMask        selective fine-tuning: only a global top-k of the trainable elements,
                         ranked once per request by |theta * grad of the forget loss|, may change
    ProtectedProjection  gradient projection: cross-attention key / value weights change only
                         orthogonally to the protected text embeddings, so their keys and
                         values stay the same

And, not published:

    KeyValueAnchor       a loss: the keys, and the values handed to the image, that the
                         protected prompts' token states give are held softly, in least
                         squares (`regularizers.key_value_anchor`)
    StartTokenHold       the start token's key and value in every cross-attention layer stay
                         the teacher's (`step.hold_start_token`)
    LowRankChange        every trained matrix's change from the teacher is cut to its best
                         rank-r approximation after each optimizer step (`step.update_rank`)

All leave the weights they do not allow to change exactly at the reference (the frozen
teacher, M_{i-1}): AdamW's per-element scaling and weight decay would otherwise move them.
L1-SP / L2-SP are losses: `objectives.StartingPointPenalty`.
"""

import torch
import torch.nn.functional as F

KEY_VALUE = (".attn2.to_k.weight", ".attn2.to_v.weight")  # input dimension = the text embedding width


def top_k_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly the global top `fraction` of all elements by score."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"regularizers.selective.fraction must be in (0, 1] (got {fraction})")
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    k = max(1, round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(k).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


class SelectiveMask:
    """Selective fine-tuning: gradients masked, and the unselected weights held at the reference."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @classmethod
    def from_gradients(cls, unet: torch.nn.Module, fraction: float) -> "SelectiveMask":
        """Importance |theta * grad| of the trainable parameters (grads accumulated by the caller)."""
        scores = {
            name: (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            for name, p in unet.named_parameters()
            if p.requires_grad
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for score in scores.values():  # each rank saw its slice of the batch: one mask for all
                torch.distributed.all_reduce(score)
        return cls(top_k_mask(scores, fraction))

    def mask_gradients(self, unet: torch.nn.Module) -> None:
        for name, p in unet.named_parameters():
            if p.grad is not None and name in self.masks:
                p.grad.mul_(self.masks[name].to(p.grad.device))

    @torch.no_grad()
    def hold(self, unet: torch.nn.Module, reference: torch.nn.Module) -> None:
        ref = dict(reference.named_parameters())
        for name, p in unet.named_parameters():
            if name in self.masks:
                p.copy_(torch.where(self.masks[name].to(p.device), p, ref[name].to(p.dtype)))


def protected_columns(text_states: torch.Tensor, dedup_cosine: float | None) -> torch.Tensor:
    """C (width, n): every token state of the protected prompts, dropping each column whose
    cosine to an earlier kept one exceeds `dedup_cosine` (None keeps all)."""
    columns = text_states.detach().reshape(-1, text_states.shape[-1]).double()
    if dedup_cosine is None:
        return columns.T
    unit = F.normalize(columns, dim=1)
    kept = [0]
    for i in range(1, len(columns)):
        if (unit[kept] @ unit[i]).max() <= dedup_cosine:
            kept.append(i)
    return columns[kept].T


def projection_matrix(C: torch.Tensor) -> torch.Tensor:
    """`P = I - C (C^T C + eps I)^-1 C^T`, `eps = max(1e-4, 1e-6 tr(C^T C) / n)` (float64, width x width).

    Computed as `I - (C C^T + eps I)^-1 C C^T`, the same matrix (push-through identity) with a
    width x width solve instead of an n x n one.
    """
    width, n = C.shape
    gram = C @ C.T  # tr(C C^T) = tr(C^T C)
    eps = max(1e-4, 1e-6 * float(gram.trace()) / n)
    identity = torch.eye(width, dtype=C.dtype, device=C.device)
    return identity - torch.linalg.solve(gram + eps * identity, gram)


class ProtectedProjection:
    """Gradient projection on cross-attention keys / values (`attn2.to_k`, `attn2.to_v`).

    `grad <- grad @ P` after backward, as published; and, after each optimizer step,
    `W <- W_ref + (W - W_ref) @ P`, so `(W - W_ref) c ~ 0` for every protected embedding `c`
    whatever the optimizer does with the projected gradient (AdamW rescales each element).
    """

    def __init__(self, unet: torch.nn.Module, text_states: torch.Tensor, dedup_cosine: float | None):
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad and n.endswith(KEY_VALUE)]
        C = protected_columns(text_states, dedup_cosine)
        self.columns, self.P = C.shape[1], projection_matrix(C)

    def project_gradients(self, unet: torch.nn.Module) -> None:
        params = dict(unet.named_parameters())
        for name in self.names:
            grad = params[name].grad
            if grad is not None:
                grad.copy_((grad.double() @ self.P.to(grad.device)).to(grad.dtype))

    @torch.no_grad()
    def project_update(self, unet: torch.nn.Module, reference: torch.nn.Module) -> None:
        params, ref = dict(unet.named_parameters()), dict(reference.named_parameters())
        for name in self.names:
            p, r = params[name], ref[name].to(params[name].device).double()
            p.copy_((r + (p.double() - r) @ self.P.to(p.device)).to(p.dtype))


def affine_matrix(linear: torch.nn.Linear) -> torch.Tensor:
    """[W | b] (out, in + 1): the layer's map of [x; 1]."""
    bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
    return torch.cat([linear.weight, bias.unsqueeze(1)], 1)


def anchored_map(attn: torch.nn.Module, kind: str) -> torch.Tensor:
    """What a cross-attention layer makes of a token state [e; 1]: its key (`to_k`), or the value it
    hands the image once attended (`to_out` after `to_v`, biases included)."""
    if kind == "key":
        return affine_matrix(attn.to_k)
    value, out = affine_matrix(attn.to_v), affine_matrix(attn.to_out[0])
    path = out[:, :-1] @ value
    return torch.cat([path[:, :-1], path[:, -1:] + out[:, -1:]], 1)


class KeyValueAnchor:
    """`mean over the anchored maps M of sum_p w_p ||(M - M_p) C_p||^2 / sum_p w_p ||M_p C_p||^2` (a loss).

    Each part p is a reference network, the protected prompts' token states C_p it holds, as
    columns (a 1 appended to each, for the biases), and how much they count, w_p; the maps are, for
    every cross-attention layer, its key `W_k` and its value path `W_o W_v` (what a token hands the
    image once attended; `to_out` acts on every prompt's attended values, so holding `W_v` alone
    leaves it free). Each term is how far what the protected tokens give moved from their
    reference's, relative to its size. With one reference (the teacher) for every state, each
    counted once, this is `||(M - M_teacher) C||^2 / ||M_teacher C||^2`. ProtectedProjection holds
    the keys and values exactly, and the protected states span the whole text width (MiniCanvas:
    682 states in 256 dimensions), which leaves no room to forget in; here a direction the
    protected tokens use little costs little, as in the preservation term of closed-form concept
    editing (UCE). `w ||D C_p||^2 / n = tr(D G_p D^T)` with G_p = w C_p C_p^T / n, n the states of
    all parts; the parts held at one reference share one gram, computed once per request.
    """

    def __init__(self, unet: torch.nn.Module, parts: list[tuple[torch.nn.Module, torch.Tensor, float]]):
        count = sum(text_states.shape[:-1].numel() for _, text_states, _ in parts)
        by_reference: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # id(reference) -> (reference, gram)
        for reference, text_states, weight in parts:
            states = text_states.detach().reshape(-1, text_states.shape[-1]).double()
            states = torch.cat([states, torch.ones_like(states[:, :1])], 1)
            _, gram = by_reference.get(id(reference), (reference, 0.0))
            by_reference[id(reference)] = (reference, gram + weight * (states.T @ states) / count)
        references = [dict(reference.named_modules()) for reference, _ in by_reference.values()]
        grams = [gram for _, gram in by_reference.values()]
        # (the student's attn2, "key" | "value", each reference's map, the summed size sum_p w_p ||M_p C_p||^2 / n).
        # The references are frozen, so their maps are computed once per request (at SDXL scale ~1.4 GB in
        # float32 per reference); the grams are kept once, for every term.
        self.terms = []
        for name, attn in unet.named_modules():
            if not name.endswith("attn2"):
                continue
            for kind, layers in (("key", (attn.to_k,)), ("value", (attn.to_v, attn.to_out[0]))):
                if any(p.requires_grad for layer in layers for p in layer.parameters()):
                    with torch.no_grad():
                        refs = [anchored_map(modules[name], kind).double() for modules in references]
                        size = sum(float(((ref @ gram.to(ref.device)) * ref).sum()) for ref, gram in zip(refs, grams))
                    self.terms.append((attn, kind, [ref.float() for ref in refs], size))
        self.grams = [gram.float() for gram in grams]

    def __call__(self) -> torch.Tensor:
        device = self.terms[0][0].to_k.weight.device
        if self.grams[0].device != device:  # once, where the student was moved after this was built
            self.grams = [gram.to(device) for gram in self.grams]
            self.terms = [(attn, kind, [ref.to(device) for ref in refs], size) for attn, kind, refs, size in self.terms]
        total = 0.0
        for attn, kind, refs, size in self.terms:
            moved = anchored_map(attn, kind).float()
            for ref, gram in zip(refs, self.grams):
                change = moved - ref
                total = total + ((change @ gram) * change).sum() / size
        return total / len(self.terms)


class StartTokenHold:
    """The start token's cross-attention key, value and output held at the reference's.

    The text encoder is causal, so the start token's state is the same in every prompt, the
    empty one included, and it is there in every cross-attention a prompt makes: a change of its
    key W_k s, or of what it hands the image W_o W_v s, or of `to_out`'s bias, is a change to
    every prompt. After each optimizer step: W_k, W_v <- R + (W - R) (I - s s^T / s^T s);
    W_o <- R_o + (W_o - R_o) (I - v v^T / v^T v) with v = R_v s; the bias <- R's. (R: the
    reference, the frozen teacher, so the directions are computed once per request.) Weights
    that are not trained are left as they are.
    """

    def __init__(self, unet: torch.nn.Module, reference: torch.nn.Module, start_state: torch.Tensor):
        self.held = []  # (trained weight, its reference, the unit direction its change is held off)
        self.biases = []  # (trained bias, its reference)
        references = dict(reference.named_modules())
        for name, layer in unet.named_modules():
            if not name.endswith("attn2"):
                continue
            ref = references[name]
            start = start_state.detach().to(ref.to_v.weight.device, torch.float64)
            value = ref.to_v.weight.double() @ start  # = the held W_v s
            for weight, ref_weight, direction in (
                (layer.to_k.weight, ref.to_k.weight, start),
                (layer.to_v.weight, ref.to_v.weight, start),
                (layer.to_out[0].weight, ref.to_out[0].weight, value),
            ):
                if weight.requires_grad:
                    self.held.append((weight, ref_weight, direction / direction.norm()))
            bias = layer.to_out[0].bias
            if bias is not None and bias.requires_grad:
                self.biases.append((bias, ref.to_out[0].bias))

    @torch.no_grad()
    def hold(self) -> None:
        for weight, reference, unit in self.held:
            r = reference.double()
            change = weight.double() - r
            weight.copy_((r + change - torch.outer(change @ unit, unit)).to(weight.dtype))
        for bias, reference in self.biases:
            bias.copy_(reference)


class LowRankChange:
    """Every trained matrix W changes from its reference R by at most rank r: after each optimizer step,
    W <- R + the best rank-r approximation of W - R (truncated SVD, Eckart-Young). A concept's edit in
    closed-form methods (UCE, MACE) is of low rank in each cross-attention projection; a full-rank change
    also moves directions no training prompt reads. Vectors (biases, norms) are left free. The
    reference is the frozen teacher."""

    def __init__(self, unet: torch.nn.Module, reference: torch.nn.Module, rank: int):
        if rank < 1:
            raise ValueError(f"update_rank must be >= 1 (got {rank}; 0 turns it off)")
        references = dict(reference.named_parameters())
        self.rank = rank
        self.held = [(p, references[n]) for n, p in unet.named_parameters() if p.requires_grad and p.dim() >= 2]

    @torch.no_grad()
    def hold(self) -> None:
        for weight, reference in self.held:
            r = reference.to(weight.device).float()
            change = (weight.float() - r).reshape(weight.shape[0], -1)
            if min(change.shape) <= self.rank:
                continue
            u, s, vh = torch.linalg.svd(change, full_matrices=False)
            kept = (u[:, : self.rank] * s[: self.rank]) @ vh[: self.rank]
            weight.copy_((r + kept.reshape(weight.shape)).to(weight.dtype))
