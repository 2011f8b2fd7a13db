"""One loaded backbone serving many adapters (MeLo), for the scoring engine (torch).

LoRA adapters for the same backbone (same weights, input size and qkv layout) become named
peft adapters on one wrapper, each with its own head and final norm, so switching is a
``set_adapter``; linear probes use the same backbone with LoRA disabled.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdapterError
from ..models.backbones import BackboneInfo
from ..models.classifier import NoduleClassifier
from ..models.lora import LoraSpec, lora_config, prepare_for_lora
from .archive import AdapterFiles
from .manifest import AdapterManifest
from .package import create_backbone_for, load_head_weights, load_lora_weights, lora_spec_of


def backbone_key(manifest: AdapterManifest) -> tuple:
    """What adapters must agree on to share a backbone (``SharedBackbone.key``)."""
    lora = lora_spec_of(manifest)
    split = lora is not None and lora.targets == "qv"
    return (manifest.backbone, manifest.backbone_sha256, manifest.random_init_fingerprint, manifest.spec.pixels,
            split)


@dataclass
class SharedBackbone:
    """A frozen ViT (q, k, v split when ``key[-1]``) and the peft wrapper holding its LoRA adapters."""

    key: tuple
    vit: nn.Module
    info: BackboneInfo
    peft: nn.Module | None = None
    active_lora: str | None = None
    users: set[str] = field(default_factory=set)

    @classmethod
    def prepare(cls, vit: nn.Module, info: BackboneInfo, split_qkv: bool, device: torch.device) -> SharedBackbone:
        """Freeze ``vit`` and split its qkv (``qv`` LoRA targets need q and v apart)."""
        if split_qkv:
            prepare_for_lora(vit, LoraSpec(targets="qv"))
        for param in vit.parameters():
            param.requires_grad_(False)
        return cls(cls.key_of(info, split_qkv), vit.to(device).eval(), info)

    @staticmethod
    def key_of(info: BackboneInfo, split_qkv: bool) -> tuple:
        """The key ``backbone_key`` gives the adapters that can share this backbone."""
        return (info.name, info.identity, info.random_init_fingerprint, info.img_size, split_qkv)

    @classmethod
    def for_adapter(cls, adapter: AdapterFiles, weights, device: torch.device) -> SharedBackbone:
        """The backbone ``adapter`` was trained on, found by its manifest's hash and checked."""
        vit, info = create_backbone_for(adapter, weights)
        return cls.prepare(vit, info, backbone_key(adapter.manifest)[-1], device)

    def attach(self, adapter: AdapterFiles, lora_name: str | None, device: torch.device) -> NoduleClassifier:
        """A classifier for ``adapter`` on this backbone; its LoRA (if any) becomes ``lora_name``."""
        manifest = adapter.manifest
        if manifest.mode == "lora":
            from peft import get_peft_model

            config = lora_config(self.vit, lora_spec_of(manifest))
            if self.peft is None:
                self.peft = get_peft_model(self.vit, config, adapter_name=lora_name)
            else:
                self.peft.add_adapter(lora_name, config)
            self.active_lora = None  # peft may have changed it; set again before scoring
            try:
                load_lora_weights(self.peft, adapter, lora_name)
            except AdapterError:
                self.remove_lora(lora_name)
                raise
        else:
            lora_name = None
        model = NoduleClassifier(self.peft if lora_name else self.vit, manifest.spec, self.info.embed_dim,
                                 fusion=manifest.fusion)
        model.to(device)
        try:
            load_head_weights(model, adapter)
        except AdapterError:
            if lora_name:
                self.remove_lora(lora_name)
            raise
        return model.eval()

    def remove_lora(self, lora_name: str) -> None:
        """Delete one LoRA adapter; with the last one, unwrap the backbone entirely."""
        if len(self.peft.peft_config) > 1:
            if lora_name in self.peft.active_adapters:  # activate another first: peft warns otherwise
                self.peft.set_adapter(next(n for n in self.peft.peft_config if n != lora_name))
            self.peft.delete_adapter(lora_name)
        else:
            self.peft.unload()  # restores the plain layers in place (same ViT object)
            self.peft = None
        self.active_lora = None

    def activate(self, lora_name: str | None):
        """Make ``lora_name`` the active LoRA (None: run without LoRA); returns the forward context."""
        if self.peft is None or not self.peft.peft_config:
            return nullcontext()
        if lora_name is None:
            return self.peft.disable_adapter()  # a linear probe on a backbone that also has LoRA
        if self.active_lora != lora_name:
            self.peft.set_adapter(lora_name)
            self.active_lora = lora_name
        return nullcontext()
