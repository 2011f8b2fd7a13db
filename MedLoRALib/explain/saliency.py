"""Saliency of a (LoRA-adapted) ViT nodule classifier on the planes it reads (torch).

Two methods, both on the adapter's own patches (its manifest's ``PatchSpec``) and on the
model exactly as it scores, LoRA included:

* ``rollout`` — attention rollout (Abnar & Zuidema 2020): each block's attention, averaged
  over heads, plus the identity for the residual path, rows renormalised, multiplied
  through the blocks; the map is the pooled token's row over the patch tokens (the CLS row,
  or the mean of the patch rows for average pooling). One value per ViT patch (token).
* ``gradxinput`` — gradient × input: d(fused logit)/d(patch pixel) × pixel value. Signed:
  positive pixels push towards the positive class (e.g. malignant). One value per pixel.

timm's fused attention (``scaled_dot_product_attention``) never materialises the weights,
so they are recomputed from the output of each block's ``attn.qkv`` (a forward hook) the
way timm's own non-fused path does (q/k norms, scale, softmax). That output includes LoRA
whatever the layout: timm's fused ``qkv`` linear, peft's LoRA wrapper around it, or
MedLoRA's ``SplitQKV`` with LoRA on q and v.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..models.classifier import NoduleClassifier
from .volume import METHODS


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ModelError(f"unknown explanation method {method!r}: choose {', '.join(METHODS)}")
    return method


def cell_pixels(model: NoduleClassifier, method: str) -> int:
    """Patch pixels per map cell: the ViT patch size for rollout, 1 for gradient × input."""
    if _check_method(method) == "gradxinput":
        return 1
    size = model.vit.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _attention_weights(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, heads, T, T) from the qkv projection's output, as timm computes it."""
    for name in ("num_heads", "head_dim", "scale", "q_norm", "k_norm"):
        if not hasattr(attn, name):
            raise ModelError(f"attention rollout needs timm's Attention (qkv projection); this block's "
                             f"{type(attn).__name__} has no {name!r}")
    batch, tokens, _ = qkv.shape
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@contextmanager
def captured_attention(vit: nn.Module):
    """Collect every block's attention weights (B, heads, T, T) during the forward passes inside."""
    weights: list[torch.Tensor] = []
    handles = []
    try:
        for block in vit.blocks:
            attn = block.attn

            def hook(module, inputs, output, attn=attn):
                weights.append(_attention_weights(attn, output))

            handles.append(attn.qkv.register_forward_hook(hook))
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def _rollout_rows(weights: list[torch.Tensor], vit: nn.Module) -> torch.Tensor:
    """(M, T) rollout of the pooled token over all tokens."""
    if not weights:
        raise ModelError("no attention was recorded: the model has no transformer blocks")
    mean = weights[0].mean(dim=1)
    eye = torch.eye(mean.shape[-1], device=mean.device, dtype=mean.dtype).expand_as(mean)
    rollout = eye
    for block_weights in weights:
        mixed = 0.5 * block_weights.mean(dim=1) + 0.5 * eye  # residual: half the signal skips attention
        rollout = mixed @ rollout
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    if getattr(vit, "global_pool", "token") == "token" and prefix > 0:
        return rollout[:, 0]
    return rollout[:, prefix:].mean(dim=1)  # average pooling: every patch token's row counts


def _grid(vit: nn.Module) -> tuple[int, int]:
    grid = vit.patch_embed.grid_size
    return int(grid[0]), int(grid[1])


def _per_plane(model: NoduleClassifier, maps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·images, H, W) maps as (B, planes, H, W); ortho3's one RGB image serves all three planes."""
    maps = maps.reshape(batch, -1, *maps.shape[-2:])
    planes = len(model.patch_spec.planes)
    return maps.expand(-1, planes, -1, -1) if maps.shape[1] == 1 and planes > 1 else maps


def attention_rollout(model: NoduleClassifier, patches: torch.Tensor) -> torch.Tensor:
    """(B, planes, Gh, Gw) rollout maps of (B, planes, P, P) patches (no gradients)."""
    vit = model.vit
    with torch.no_grad(), captured_attention(vit) as weights:
        model.view_logits(patches)
    rows = _rollout_rows(weights, vit)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    grid = _grid(vit)
    return _per_plane(model, rows[:, prefix:].reshape(-1, *grid), patches.shape[0])


def gradient_x_input(model: NoduleClassifier, patches: torch.Tensor) -> torch.Tensor:
    """(B, planes, P, P) gradient × input of the fused logit (the score before temperature)."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = patches.detach().clone().requires_grad_(True)
        logits = model(inputs)
        (grad,) = torch.autograd.grad(logits.sum(), inputs)
    return (grad * inputs).detach()


def saliency_maps(model: NoduleClassifier, patches: np.ndarray, method: str = "rollout",
                  max_batch: int = 4) -> np.ndarray:
    """Saliency of each patch's planes as float32 (N, planes, H, W), in the patch's plane order.

    Args:
        model: a ready classifier (LoRA active as for scoring); it is run in eval mode.
        patches: (N, *spec.shape) cut with ``extract_patches`` and the adapter's spec.
        method: ``rollout`` (H = W = token grid) or ``gradxinput`` (H = W = patch pixels).
        max_batch: nodules per forward pass.
    """
    _check_method(method)
    array = np.asarray(patches, dtype=np.float32)
    expected = model.patch_spec.shape
    if array.ndim != 1 + len(expected) or tuple(array.shape[1:]) != expected:
        raise ModelError(f"patches have shape {array.shape}, but the model reads (N, {', '.join(map(str, expected))})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(array), max(1, int(max_batch))):
            batch = torch.from_numpy(np.ascontiguousarray(array[start:start + max_batch])).to(device)
            maps = attention_rollout(model, batch) if method == "rollout" else gradient_x_input(model, batch)
            out.append(maps.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, len(model.patch_spec.planes), 0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def randomised_copy(model: NoduleClassifier, seed: int = 0) -> NoduleClassifier:
    """A copy whose adapter is random: LoRA A and B and the head drawn afresh, final norms reset.

    The model-randomisation sanity check (Adebayo et al. 2018): a map that barely changes
    when what the adapter learned is replaced by noise does not explain the adapter. The
    frozen backbone stays as it is. Both LoRA matrices are drawn like a linear layer's default
    weights (uniform ±1/√fan-in), so the random update is of the size of the weights it adds to.
    """
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(int(seed))

    def uniform_(tensor: torch.Tensor, fan_in: int) -> None:
        bound = 1.0 / math.sqrt(max(1, fan_in))
        tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)

    with torch.no_grad():
        for name, param in clone.named_parameters():
            if "lora_A" in name or "lora_B" in name or name.startswith("head."):
                uniform_(param, param.shape[-1] if param.ndim > 1 else clone.head.in_features)
        for norm in (clone.norm, clone.fc_norm):
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()
    return clone.eval()
