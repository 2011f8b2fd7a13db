"""An adapter and a model, both ways (torch): save a model's adapter, turn an adapter into a ready model.

The files and their checks are ``archive``'s (torch-free); this module only moves tensors.
Everything that turns a verified adapter into a working network passes through here once:
``create_backbone_for`` (its backbone, found by the manifest's hash and checked),
``build_model_for`` (a whole classifier with its weights) and ``load_weights`` (into a
model built for it). Safetensors and JSON only, nothing unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ..errors import AdapterError, MedLoRAError
from ..models.backbones import BackboneInfo, create_backbone, weights_source
from ..models.classifier import NoduleClassifier, build_model
from ..models.lora import LoraSpec
from .archive import (
    HEAD_WEIGHTS,
    LORA_CONFIG,
    LORA_WEIGHTS,
    MODEL_WEIGHTS,
    REQUIRED_FILES,
    AdapterFiles,
    read_checked,
    write_adapter,
)
from .manifest import FORMAT_VERSION, AdapterManifest

log = logging.getLogger(__name__)

__all__ = ["HEAD_WEIGHTS", "LORA_CONFIG", "LORA_WEIGHTS", "MODEL_WEIGHTS", "REQUIRED_FILES", "save_adapter",
           "load_adapter", "build_model_for", "create_backbone_for", "load_weights", "check_backbone"]

_HEAD_PREFIXES = {"lora": ("head.", "norm.", "fc_norm."), "linear": ("head.",)}


# --- model → adapter --------------------------------------------------------------------------

def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
                            metadata={"format": "pt"})


def _model_attr(model: NoduleClassifier, name: str):
    if not hasattr(model, name):
        raise AdapterError(f"model has no {name!r}: build it with MedLoRALib.models.build_model")
    return getattr(model, name)


def head_state(model: NoduleClassifier, mode: str) -> dict[str, torch.Tensor]:
    """The classifier tensors an adapter of ``mode`` stores besides LoRA."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(_HEAD_PREFIXES[mode])}


def serialise(model: NoduleClassifier) -> dict[str, bytes]:
    """The weight files of ``model``'s adapter, as bytes."""
    from peft import get_peft_model_state_dict

    mode = _model_attr(model, "mode")
    if mode == "full":
        return {MODEL_WEIGHTS: _tensor_bytes(model.state_dict())}
    files = {HEAD_WEIGHTS: _tensor_bytes(head_state(model, mode))}
    if mode == "lora":
        name = _model_attr(model, "adapter_name")
        files[LORA_WEIGHTS] = _tensor_bytes(get_peft_model_state_dict(model.backbone, adapter_name=name))
        config = model.backbone.peft_config[name].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        files[LORA_CONFIG] = (json.dumps(config, indent=2, default=str) + "\n").encode()
    return files


def describe_model(model: NoduleClassifier, manifest: AdapterManifest) -> AdapterManifest:
    """Fill the manifest fields that must come from the model, so they cannot disagree."""
    info: BackboneInfo = _model_attr(model, "backbone_info")
    lora_spec: LoraSpec | None = getattr(model, "lora_spec", None)
    manifest.format_version = FORMAT_VERSION
    manifest.backbone = info.name
    manifest.backbone_sha256 = info.identity
    manifest.random_init = info.random_init
    manifest.random_init_fingerprint = info.random_init_fingerprint
    manifest.patch_spec = model.patch_spec.to_dict()
    manifest.mode = _model_attr(model, "mode")
    manifest.lora = lora_spec.to_dict() if manifest.mode == "lora" and lora_spec else None
    manifest.fusion = model.fusion
    return manifest


def save_adapter(model: NoduleClassifier, manifest: AdapterManifest, out_dir: str | Path) -> Path:
    """Write ``model``'s adapter to ``out_dir`` (a folder, or a ``.zip``) atomically.

    The backbone identity, patch spec, LoRA spec and mode are taken from the model;
    the name defaults to the folder name.
    """
    out = Path(out_dir).expanduser()
    if not manifest.name:
        manifest.name = out.stem if out.suffix.lower() == ".zip" else out.name
    describe_model(model, manifest)
    return write_adapter(manifest, serialise(model), out)


# --- adapter → model --------------------------------------------------------------------------

def lora_spec_of(manifest: AdapterManifest) -> LoraSpec | None:
    """The manifest's LoRA spec (``lora`` mode), refused with the adapter's name if malformed."""
    if manifest.mode != "lora":
        return None
    try:
        return LoraSpec.from_dict(manifest.lora)
    except (MedLoRAError, TypeError, ValueError) as exc:  # LoraSpec validates in __post_init__
        raise AdapterError(f"adapter {manifest.name!r}: invalid LoRA spec in its manifest: {exc}") from exc


def check_backbone(info: BackboneInfo, manifest: AdapterManifest, source: str) -> None:
    """Refuse an adapter made for another backbone or other backbone weights."""
    if info.name != manifest.backbone:
        raise AdapterError(f"adapter {source} was trained on backbone {manifest.backbone!r}, "
                           f"not {info.name!r}: load it with its own backbone")
    if manifest.random_init:
        if not info.random_init:
            raise AdapterError(f"adapter {source} was trained on a randomly initialised {manifest.backbone}; "
                               "it cannot be used with pretrained backbone weights")
        if manifest.random_init_fingerprint and info.random_init_fingerprint != manifest.random_init_fingerprint:
            raise AdapterError(f"adapter {source} was trained on a random {manifest.backbone} initialisation "
                               "that this timm/torch version does not reproduce; retrain it")
        return
    if info.random_init or info.weights_sha256 != manifest.backbone_sha256:
        got = "a random initialisation" if info.random_init else f"weights with SHA-256 {info.weights_sha256[:12]}…"
        raise AdapterError(
            f"adapter {source} was trained on {manifest.backbone} weights with SHA-256 "
            f"{manifest.backbone_sha256[:12]}…, but the backbone has {got}. Provide the same backbone "
            "weights file the adapter was trained with.")


def create_backbone_for(adapter: AdapterFiles, weights: str | Path | None = None) -> tuple[nn.Module, BackboneInfo]:
    """The backbone ``adapter`` was trained on, at its patch size, checked against its manifest."""
    manifest = adapter.manifest
    try:
        vit, info = create_backbone(manifest.backbone, img_size=manifest.spec.pixels,
                                    **weights_source(manifest.backbone_sha256, weights))
    except MedLoRAError as exc:
        raise AdapterError(f"adapter {adapter.source}: cannot load its backbone {manifest.backbone}: {exc}") from exc
    check_backbone(info, manifest, adapter.source)
    return vit, info


def build_model_for(adapter: AdapterFiles, weights: str | Path | None = None) -> NoduleClassifier:
    """A classifier of its own (backbone found by hash, weights loaded), in eval mode."""
    manifest = adapter.manifest
    try:
        model, _ = build_model(manifest.backbone, patch_spec=manifest.spec, mode=manifest.mode,
                               lora=lora_spec_of(manifest), fusion=manifest.fusion,
                               **weights_source(manifest.backbone_sha256, weights))
    except AdapterError:
        raise
    except MedLoRAError as exc:
        raise AdapterError(f"adapter {adapter.source}: cannot build its backbone: {exc}") from exc
    check_backbone(model.backbone_info, manifest, adapter.source)
    load_weights(model, adapter)
    return model.eval()


def _read_tensors(adapter: AdapterFiles, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(adapter.contents[name])
    except KeyError as exc:
        raise AdapterError(f"adapter {adapter.source} has no {name}") from exc
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise AdapterError(f"adapter {adapter.source}: {name} is not a valid safetensors file: {exc}") from exc


def load_lora_weights(peft_model, adapter: AdapterFiles, adapter_name: str) -> None:
    """Put an adapter's LoRA tensors into ``peft_model``'s adapter ``adapter_name``."""
    from peft import set_peft_model_state_dict

    state = _read_tensors(adapter, LORA_WEIGHTS)
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    except RuntimeError as exc:  # shape mismatches
        raise AdapterError(f"adapter {adapter.source}: LoRA weights do not fit the model: {exc}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise AdapterError(f"adapter {adapter.source}: LoRA weights do not match its LoRA spec "
                           f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")


def load_head_weights(model: NoduleClassifier, adapter: AdapterFiles) -> None:
    """The head (and, for LoRA, the final norms) of a ``lora`` or ``linear`` adapter."""
    mode = adapter.manifest.mode
    state = _read_tensors(adapter, HEAD_WEIGHTS)
    expected = set(head_state(model, mode))
    if set(state) != expected:
        raise AdapterError(f"adapter {adapter.source}: head file holds {sorted(state)}, expected {sorted(expected)}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise AdapterError(f"adapter {adapter.source}: head weights do not fit the model: {exc}") from exc


def load_weights(model: NoduleClassifier, adapter: AdapterFiles) -> None:
    """Load an adapter's tensors into a model built for it (``build_model``)."""
    if adapter.manifest.mode == "full":
        try:
            model.load_state_dict(_read_tensors(adapter, MODEL_WEIGHTS), strict=True)
        except RuntimeError as exc:
            raise AdapterError(f"adapter {adapter.source}: weights do not fit the model: {exc}") from exc
        return
    if adapter.manifest.mode == "lora":
        load_lora_weights(model.backbone, adapter, model.adapter_name)
    load_head_weights(model, adapter)


def _check_model_matches(model: NoduleClassifier, adapter: AdapterFiles) -> None:
    manifest, source = adapter.manifest, adapter.source
    check_backbone(_model_attr(model, "backbone_info"), manifest, source)
    if model.patch_spec != manifest.spec:
        raise AdapterError(f"adapter {source} reads {manifest.spec}, the model was built for {model.patch_spec}")
    if getattr(model, "mode", None) != manifest.mode:
        raise AdapterError(f"adapter {source} is a {manifest.mode!r} adapter, the model is {model.mode!r}")
    if manifest.mode == "lora" and model.lora_spec != lora_spec_of(manifest):
        raise AdapterError(f"adapter {source} has LoRA {manifest.lora}, the model {model.lora_spec.to_dict()}")


def load_adapter(path: str | Path, model: NoduleClassifier | None = None, *, weights=None,
                 allow_random_init: bool | None = None) -> tuple[NoduleClassifier, AdapterManifest]:
    """Load an adapter (folder or ``.zip``), building its model unless one is given.

    Every file is checked against the SHA-256 in the manifest, the backbone against
    the manifest's backbone hash. ``allow_random_init=None`` follows the manifest: an
    adapter trained on a random backbone gets the same seeded random backbone (and
    says so in its results); ``False`` refuses such an adapter.
    """
    adapter = read_checked(path)
    manifest = adapter.manifest
    if manifest.random_init:
        if allow_random_init is False:
            raise AdapterError(f"adapter {adapter.source} was trained on a randomly initialised backbone; "
                               "pass allow_random_init=True to use it anyway (results are flagged)")
        log.warning("adapter %s uses a randomly initialised backbone: not a clinical result", manifest.name)
    if model is None:
        return build_model_for(adapter, weights), manifest
    _check_model_matches(model, adapter)
    load_weights(model, adapter)
    model.eval()
    return model, manifest
