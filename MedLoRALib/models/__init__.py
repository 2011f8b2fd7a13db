"""Backbones, LoRA and the nodule classifier (torch)."""

from .backbones import (
                        BackboneConfig,
                        BackboneInfo,
                        create_backbone,
                        get_backbone_config,
                        list_backbones,
                        register_backbone,
)
from .classifier import NoduleClassifier, build_model, trainable_parameter_count
from .lora import LoraSpec, split_qkv

__all__ = ["BackboneConfig", "BackboneInfo", "create_backbone", "get_backbone_config", "list_backbones",
           "register_backbone", "NoduleClassifier", "build_model", "trainable_parameter_count", "LoraSpec",
           "split_qkv"]
