"""The nodule classifier: a (LoRA-adapted) ViT, a per-view head and the fusion of views.

View sets map to the model as in the papers: ``ortho3`` is one 3-channel image (axial,
coronal, sagittal as RGB); ``multiview9`` scores each of the nine planes as a grey
image replicated to 3 channels and fuses the per-view logits; ``axial`` is one grey
image. The ViT's final norm(s) belong to the classifier, not the backbone, so several
classifiers (adapters) can share one backbone while each keeps its own trained norm.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from ..errors import ModelError
from ..patches import PatchSpec
from .backbones import BackboneInfo, create_backbone
from .lora import LoraSpec, apply_lora, frozen_prefix_blocks

MODES = ("lora", "full", "linear")
FUSIONS = ("mean", "max")
_PRISTINE_NORMS = "_medlora_pristine_norms"


def base_vit(backbone: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a backbone (unwrapping a peft model)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def take_final_norms(vit: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Copies of the ViT's final ``norm`` and ``fc_norm``; the ViT's own become Identity.

    The first call keeps the pretrained modules aside (not as submodules, so they are
    neither counted nor moved), and every call returns fresh copies of them.
    """
    pristine = vit.__dict__.get(_PRISTINE_NORMS)
    if pristine is None:
        pristine = (vit.norm, vit.fc_norm)
        vit.__dict__[_PRISTINE_NORMS] = pristine
        vit.norm, vit.fc_norm = nn.Identity(), nn.Identity()
    device = next(vit.parameters()).device
    return tuple(copy.deepcopy(module).to(device) for module in pristine)


class NoduleClassifier(nn.Module):
    """Backbone + final norm + one linear head applied per view, views fused into one logit.

    Args:
        backbone: a timm VisionTransformer, or a peft model wrapping one.
        patch_spec: the crop the model reads; fixes how planes become images.
        embed_dim: the backbone's token width.
        fusion: ``mean`` (default) or ``max`` of the per-view logits.
    """

    def __init__(self, backbone: nn.Module, patch_spec: PatchSpec, embed_dim: int, fusion: str = "mean") -> None:
        super().__init__()
        if patch_spec.views == "cube":
            raise ModelError("a 2D ViT cannot read 'cube' patches: use the axial, ortho3 or multiview9 view set")
        if fusion not in FUSIONS:
            raise ModelError(f"unknown fusion {fusion!r}: choose {', '.join(FUSIONS)}")
        self.backbone = backbone
        self.patch_spec = patch_spec
        self.fusion = fusion
        self.norm, self.fc_norm = take_final_norms(base_vit(backbone))
        self.head = nn.Linear(embed_dim, 1)
        self.frozen_blocks = 0  # leading blocks run without autograd (LoRA on the last N only)

    @property
    def vit(self) -> nn.Module:
        return base_vit(self.backbone)

    @property
    def views(self) -> int:
        return 1 if self.patch_spec.views == "ortho3" else len(self.patch_spec.planes)

    def _images(self, patches: torch.Tensor) -> torch.Tensor:
        expected = self.patch_spec.shape
        if patches.ndim != 4 or tuple(patches.shape[1:]) != expected:
            raise ModelError(f"patches must be (batch, {', '.join(map(str, expected))}) for view set "
                             f"{self.patch_spec.views!r}, got {tuple(patches.shape)}")
        if self.patch_spec.views == "ortho3":
            return patches
        b, v, h, w = patches.shape
        return patches.reshape(b * v, 1, h, w).expand(-1, 3, -1, -1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normed features (M, embed_dim) of (M, 3, P, P) images."""
        frozen = self.frozen_blocks if self.training else 0
        with torch.no_grad() if frozen else nullcontext():
            x = self.tokens(images, frozen)
        return self.features_from(x, frozen)

    def tokens(self, images: torch.Tensor, blocks: int = 0) -> torch.Tensor:
        """Tokens after the patch embedding and the first ``blocks`` blocks (the part adapters with
        LoRA only in later blocks share; the scoring engine computes it once for an ensemble)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:blocks]:
            x = block(x)
        return x

    def features_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled, normed features from ``tokens(images, start)``: the remaining blocks, norm and pooling."""
        vit = self.vit
        for block in vit.blocks[start:]:
            x = block(x)
        return self.fc_norm(vit.pool(self.norm(x)))

    def view_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, views) logits, one per plane (one for ortho3)."""
        logits = self.head(self.features(self._images(patches)))
        return logits.reshape(patches.shape[0], self.views)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B,) fused logits of (B, planes, P, P) patches as extract_patches gives them."""
        per_view = self.view_logits(patches)
        return per_view.mean(dim=1) if self.fusion == "mean" else per_view.amax(dim=1)


def set_trainable(model: NoduleClassifier, mode: str) -> None:
    """Freeze/unfreeze for ``mode``: lora = LoRA + norm + head, full = all, linear = head."""
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}: choose {', '.join(MODES)}")
    for name, param in model.named_parameters():
        if mode == "full":
            param.requires_grad_(True)
        elif name.startswith("head."):
            param.requires_grad_(True)
        elif mode == "lora":
            param.requires_grad_(name.startswith(("norm.", "fc_norm.")) or "lora_" in name)
        else:
            param.requires_grad_(False)


def build_model(backbone: str, *, patch_spec: PatchSpec, mode: str = "lora", lora: LoraSpec | None = None,
                weights=None, allow_random_init: bool = False, fusion: str = "mean",
                pretrained: bool = True) -> tuple[NoduleClassifier, BackboneInfo]:
    """A classifier ready to train in ``mode`` (lora | full | linear) on ``patch_spec`` crops.

    The backbone is built at ``patch_spec.pixels`` (timm resamples its position
    embedding). The returned model carries ``backbone_info``, ``mode`` and
    ``lora_spec`` attributes, which ``save_adapter`` writes into the manifest.
    """
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}: choose {', '.join(MODES)}")
    vit, info = create_backbone(backbone, weights=weights, pretrained=pretrained,
                                allow_random_init=allow_random_init, img_size=patch_spec.pixels)
    spec = (lora or LoraSpec()) if mode == "lora" else None
    wrapped = apply_lora(vit, spec) if spec is not None else vit
    model = NoduleClassifier(wrapped, patch_spec, info.embed_dim, fusion=fusion)
    model.frozen_blocks = frozen_prefix_blocks(info.depth, spec)
    set_trainable(model, mode)
    model.backbone_info = info
    model.mode = mode
    model.lora_spec = spec
    model.adapter_name = "default"
    return model, info


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
