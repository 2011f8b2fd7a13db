"""LoRA on a timm ViT with peft, in the faithful MeLo / MED-PEFT form or on timm's fused layers.

timm ViTs compute q, k and v with one fused ``attn.qkv`` linear; peft on that layer
shares one LoRA A matrix between q, k and v. The ``qv`` target set instead splits the
fused layer into exact q, k and v linears and adapts only q and v, as the papers do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from ..lora_spec import TARGET_SETS, LoraSpec

__all__ = ["TARGET_SETS", "LoraSpec", "SplitQKV", "split_qkv", "is_split", "adapted_blocks",
           "target_module_names", "lora_config", "prepare_for_lora", "apply_lora", "frozen_prefix_blocks"]

# timm module names (relative to a block) adapted by each fused target set.
_FUSED_TARGETS = {
    "qkv": ("attn.qkv",),
    "attn": ("attn.qkv", "attn.proj"),
    "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
}


class SplitQKV(nn.Module):
    """Drop-in for a fused qkv linear: three linears whose concatenated output is identical."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        out = fused.out_features
        if out % 3:
            raise ModelError(f"cannot split a qkv linear with {out} outputs into three equal parts")
        part = out // 3
        bias = fused.bias is not None
        weight = fused.weight.detach()
        kwargs = dict(device=weight.device, dtype=weight.dtype)
        self.q, self.k, self.v = (nn.Linear(fused.in_features, part, bias=bias, **kwargs) for _ in range(3))
        with torch.no_grad():
            for index, linear in enumerate((self.q, self.k, self.v)):
                linear.weight.copy_(weight[index * part:(index + 1) * part])
                if bias:
                    linear.bias.copy_(fused.bias.detach()[index * part:(index + 1) * part])
                linear.weight.requires_grad_(fused.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(vit: nn.Module) -> nn.Module:
    """Replace every block's fused ``attn.qkv`` by a SplitQKV holding the same weights (in place)."""
    for block in vit.blocks:
        qkv = block.attn.qkv
        if isinstance(qkv, SplitQKV):
            continue
        if not isinstance(qkv, nn.Linear):
            raise ModelError(f"cannot split attn.qkv of type {type(qkv).__name__}; expected nn.Linear")
        block.attn.qkv = SplitQKV(qkv)
    return vit


def is_split(vit: nn.Module) -> bool:
    return all(isinstance(block.attn.qkv, SplitQKV) for block in vit.blocks)


def adapted_blocks(depth: int, spec: LoraSpec) -> range:
    """Indices of the blocks that get LoRA."""
    if spec.last_n_blocks is None:
        return range(depth)
    return range(max(0, depth - spec.last_n_blocks), depth)


def target_module_names(vit: nn.Module, spec: LoraSpec) -> list[str]:
    """Full module names (relative to the ViT) peft should adapt."""
    names = []
    for index in adapted_blocks(len(vit.blocks), spec):
        if spec.targets == "qv":
            names += [f"blocks.{index}.attn.qkv.q", f"blocks.{index}.attn.qkv.v"]
        else:
            names += [f"blocks.{index}.{suffix}" for suffix in _FUSED_TARGETS[spec.targets]]
    return names


def lora_config(vit: nn.Module, spec: LoraSpec):
    """The peft LoraConfig for ``spec`` on this ViT (qkv must already be split for ``qv``)."""
    from peft import LoraConfig

    if spec.targets == "qv" and not is_split(vit):
        raise ModelError("target set 'qv' needs split_qkv(vit) first")
    if spec.targets != "qv" and is_split(vit):
        raise ModelError(f"target set {spec.targets!r} adapts timm's fused qkv, but this ViT's qkv is split")
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=target_module_names(vit, spec), bias="none",
                      use_rslora=spec.use_rslora, use_dora=spec.use_dora)


def prepare_for_lora(vit: nn.Module, spec: LoraSpec) -> nn.Module:
    """Give the ViT the module layout ``spec`` needs (split qkv for ``qv``)."""
    return split_qkv(vit) if spec.targets == "qv" else vit


def apply_lora(vit: nn.Module, spec: LoraSpec, adapter_name: str = "default"):
    """Wrap the ViT in a peft model with one LoRA adapter; every base weight is frozen."""
    from peft import get_peft_model

    prepare_for_lora(vit, spec)
    return get_peft_model(vit, lora_config(vit, spec), adapter_name=adapter_name)


def frozen_prefix_blocks(depth: int, spec: LoraSpec | None) -> int:
    """How many leading blocks have no LoRA (run under no_grad in LoRA mode)."""
    if spec is None or spec.last_n_blocks is None:
        return 0
    return max(0, depth - spec.last_n_blocks)
