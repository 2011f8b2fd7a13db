"""The scoring engine: one backbone kept loaded, many adapters attached (MeLo), nodules scored.

LoRA adapters for the same backbone (same weights, same input size, same qkv layout)
share one backbone: each becomes a named peft adapter on it plus its own head and final
norm, so switching is ``set_adapter`` — no backbone reload. An adapter for another
backbone gets a second backbone kept beside the first (``status`` lists them); a
``full`` fine-tuned adapter carries its whole network and is kept on its own. Linear
probes share an unsplit backbone and run with LoRA disabled.

Scores are deterministic on CPU: the same patches in the same call give bit-identical
results. Test-time augmentation (on by default) averages the logits of the eight
in-plane flips/90° rotations of every plane.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .adapters.manifest import AdapterManifest
from .adapters.package import check_backbone, load_head_weights, load_lora_weights, load_weights, read_checked
from .adapters.store import AdapterStore, check_name, resolve_adapter
from .device import choose_device
from .errors import AdapterError, MedLoRAError, PatchError
from .image import CTImage
from .models.backbones import BackboneInfo, create_backbone, find_local_weights
from .models.classifier import NoduleClassifier, build_model
from .models.lora import LoraSpec, lora_config, prepare_for_lora
from .nodule import Nodule, centres_lps
from .patches import extract_patches

log = logging.getLogger(__name__)

TTA_TRANSFORMS = tuple(itertools.product((0, 1, 2, 3), (False, True)))  # (quarter turns, flip columns)


@dataclass
class _Backbone:
    """One loaded backbone and the peft wrapper holding its LoRA adapters."""

    key: tuple
    vit: nn.Module
    info: BackboneInfo
    peft: nn.Module | None = None
    active_lora: str | None = None
    users: set[str] = field(default_factory=set)


@dataclass
class _Attached:
    name: str
    manifest: AdapterManifest
    model: NoduleClassifier
    backbone: _Backbone | None  # None: a full fine-tuned model that owns its network
    lora_name: str | None = None  # the adapter's name inside peft


def apply_tta(patches: torch.Tensor, quarter_turns: int, flip: bool) -> torch.Tensor:
    """One in-plane flip/rotation of every plane of (B, planes, P, P) patches."""
    out = torch.flip(patches, dims=(-1,)) if flip else patches
    return torch.rot90(out, quarter_turns, dims=(-2, -1)) if quarter_turns else out


class ScoringEngine:
    """Keeps backbones and adapters loaded and scores nodule patches.

    Args:
        device: ``cpu``, ``cuda``, ``mps`` or None/``auto`` (see ``choose_device``).
        max_batch_images: images (patches × planes × TTA variants) per forward pass.
        store: adapter store used to resolve adapter names.
    """

    def __init__(self, device: str | torch.device | None = None, max_batch_images: int = 288,
                 store: AdapterStore | None = None) -> None:
        self.device = choose_device(None if device is None else str(device))
        self.max_batch_images = int(max_batch_images)
        self.store = store or AdapterStore()
        self._adapters: dict[str, _Attached] = {}
        self._backbones: dict[tuple, _Backbone] = {}
        self.active: str | None = None
        self.backbone_loads = 0
        self._lora_ids = itertools.count()

    # --- adapters -----------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def manifest(self, name: str | None = None) -> AdapterManifest:
        return self._get(name).manifest

    def attach_adapter(self, path: str | Path, name: str | None = None,
                       weights: str | Path | None = None) -> AdapterManifest:
        """Attach an adapter (folder, ``.zip`` or store name) and make it active.

        ``weights`` is the backbone weights file, needed only when its backbone is not
        loaded yet and not found otherwise. Re-attaching a name replaces that adapter.
        """
        location = resolve_adapter(path, self.store)
        manifest, contents = read_checked(location)
        name = check_name(name or manifest.name)
        if name in self._adapters:
            self.detach_adapter(name)
        source = str(location)
        if manifest.random_init:
            log.warning("adapter %s was trained on a randomly initialised backbone: its scores are flagged "
                        "random_init and mean nothing clinically", name)
        if manifest.mode == "full":
            attached = self._attach_full(name, manifest, contents, weights, source)
        else:
            attached = self._attach_shared(name, manifest, contents, weights, source)
        self._adapters[name] = attached
        self.active = name
        return manifest

    def _attach_full(self, name, manifest, contents, weights, source) -> _Attached:
        if weights is None and not manifest.random_init:
            weights = find_local_weights(manifest.backbone_sha256)
        try:
            model, info = build_model(manifest.backbone, patch_spec=manifest.spec, mode="full",
                                      weights=None if manifest.random_init else weights, fusion=manifest.fusion,
                                      pretrained=not manifest.random_init, allow_random_init=manifest.random_init)
        except MedLoRAError as exc:
            raise AdapterError(f"adapter {source}: cannot build its backbone: {exc}") from exc
        self.backbone_loads += 1
        check_backbone(info, manifest, source)
        load_weights(model, manifest, contents, source)
        return _Attached(name, manifest, model.to(self.device).eval(), None)

    def load_backbone(self, name: str, weights: str | Path | None = None, pixels: int | None = None,
                      split_qkv: bool = True, allow_random_init: bool = False) -> dict:
        """Load a backbone ahead of its adapters (e.g. at engine start), so attaching is fast.

        Adapters attached later share it when they name the same backbone, weights, patch
        pixels and q/v split (the ``qv`` LoRA targets split the fused qkv).
        """
        vit, info = create_backbone(name, weights=weights, allow_random_init=allow_random_init, img_size=pixels)
        key = (info.name, info.identity, info.random_init_fingerprint, info.img_size, split_qkv)
        if key not in self._backbones:
            self._backbones[key] = self._prepare(key, vit, info, split_qkv)
        return {"backbone": info.name, "weights_sha256": info.weights_sha256, "random_init": info.random_init,
                "img_size": info.img_size, "split_qkv": split_qkv}

    def _prepare(self, key: tuple, vit: nn.Module, info: BackboneInfo, split_qkv: bool) -> _Backbone:
        self.backbone_loads += 1
        if split_qkv:
            prepare_for_lora(vit, LoraSpec(targets="qv"))
        for param in vit.parameters():
            param.requires_grad_(False)
        return _Backbone(key, vit.to(self.device).eval(), info)

    def _backbone_for(self, manifest: AdapterManifest, weights, source: str) -> _Backbone:
        split = manifest.mode == "lora" and LoraSpec.from_dict(manifest.lora).targets == "qv"
        key = (manifest.backbone, manifest.backbone_sha256, manifest.random_init_fingerprint,
               manifest.spec.pixels, split)
        if key in self._backbones:
            return self._backbones[key]
        if weights is None and not manifest.random_init:
            weights = find_local_weights(manifest.backbone_sha256)
        try:
            vit, info = create_backbone(manifest.backbone, weights=None if manifest.random_init else weights,
                                        pretrained=not manifest.random_init,
                                        allow_random_init=manifest.random_init, img_size=manifest.spec.pixels)
        except MedLoRAError as exc:
            raise AdapterError(f"adapter {source}: cannot load its backbone {manifest.backbone}: {exc}") from exc
        check_backbone(info, manifest, source)
        self._backbones[key] = self._prepare(key, vit, info, split)
        return self._backbones[key]

    def _attach_shared(self, name, manifest, contents, weights, source) -> _Attached:
        backbone = self._backbone_for(manifest, weights, source)
        lora_name = None
        if manifest.mode == "lora":
            from peft import get_peft_model

            lora_name = f"adapter{next(self._lora_ids)}"
            config = lora_config(backbone.vit, LoraSpec.from_dict(manifest.lora))
            if backbone.peft is None:
                backbone.peft = get_peft_model(backbone.vit, config, adapter_name=lora_name)
            else:
                backbone.peft.add_adapter(lora_name, config)
            backbone.active_lora = None  # peft may have changed it; set again before scoring
            try:
                load_lora_weights(backbone.peft, contents, lora_name, source)
            except AdapterError:
                self._remove_lora(backbone, lora_name)
                raise
        model = NoduleClassifier(backbone.peft if lora_name else backbone.vit, manifest.spec,
                                 backbone.info.embed_dim, fusion=manifest.fusion)
        model.to(self.device)
        load_head_weights(model, contents, manifest.mode, source)
        backbone.users.add(name)
        return _Attached(name, manifest, model.eval(), backbone, lora_name)

    @staticmethod
    def _remove_lora(backbone: _Backbone, lora_name: str) -> None:
        """Delete one LoRA adapter; with the last one, unwrap the backbone entirely."""
        if len(backbone.peft.peft_config) > 1:
            if lora_name in backbone.peft.active_adapters:  # activate another first: peft warns otherwise
                backbone.peft.set_adapter(next(n for n in backbone.peft.peft_config if n != lora_name))
            backbone.peft.delete_adapter(lora_name)
        else:
            backbone.peft.unload()  # restores the plain layers in place (same ViT object)
            backbone.peft = None
        backbone.active_lora = None

    def set_adapter(self, name: str) -> str:
        self.active = self._get(name).name
        return self.active

    def detach_adapter(self, name: str) -> list[str]:
        attached = self._get(name)
        del self._adapters[attached.name]
        backbone = attached.backbone
        if backbone is not None:
            backbone.users.discard(attached.name)
            if not backbone.users:
                self._backbones.pop(backbone.key, None)  # nothing uses it: free the memory
            elif attached.lora_name:
                self._remove_lora(backbone, attached.lora_name)
        if self.active == attached.name:
            self.active = next(iter(self._adapters), None)
        return self.adapters

    def _get(self, name: str | None) -> _Attached:
        name = name or self.active
        if name is None:
            raise AdapterError("no adapter attached: attach one first (attach_adapter / --adapter)")
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not attached (attached: {', '.join(self._adapters) or 'none'})")
        return self._adapters[name]

    def _activate(self, attached: _Attached):
        """Make the adapter's LoRA the active one on its backbone; returns the forward context."""
        backbone = attached.backbone
        if backbone is None or backbone.peft is None or not backbone.peft.peft_config:
            return nullcontext()
        if attached.lora_name is None:
            return backbone.peft.disable_adapter()  # a linear probe on a backbone that also has LoRA
        if backbone.active_lora != attached.lora_name:
            backbone.peft.set_adapter(attached.lora_name)
            backbone.active_lora = attached.lora_name
        return nullcontext()

    def status(self) -> dict:
        return {
            "backbone": [b.info.name for b in self._backbones.values()]
            + [a.manifest.backbone for a in self._adapters.values() if a.backbone is None],
            "adapters": self.adapters,
            "active": self.active,
            "device": str(self.device),
            "version": __version__,
        }

    # --- scoring ------------------------------------------------------------------------
    def _check_patches(self, patches: np.ndarray, attached: _Attached) -> np.ndarray:
        spec = attached.manifest.spec
        array = np.asarray(patches)
        if array.ndim != 1 + len(spec.shape) or tuple(array.shape[1:]) != spec.shape:
            raise PatchError(
                f"patches have shape {tuple(array.shape)}, but adapter {attached.name!r} reads "
                f"(N, {', '.join(map(str, spec.shape))}) — view set {spec.views}, {spec.pixels} px over "
                f"{spec.fov_mm:g} mm. Cut them with the adapter's patch_spec.")
        if not np.isfinite(array).all():
            raise PatchError("patches contain NaN or infinite values")
        array = np.ascontiguousarray(array, dtype=np.float32)
        return array if array.flags.writeable else array.copy()  # torch wants writable memory

    def _forward_view_logits(self, model: NoduleClassifier, batch: torch.Tensor, tta: bool) -> torch.Tensor:
        """(B, views) logits, averaged over the TTA variants."""
        variants = TTA_TRANSFORMS if tta else ((0, False),)
        stacked = torch.cat([apply_tta(batch, k, flip) for k, flip in variants])
        autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                    if self.device.type == "cuda" else nullcontext())
        with autocast:
            logits = model.view_logits(stacked).float()
        return logits.reshape(len(variants), batch.shape[0], -1).mean(dim=0)

    def _view_logits(self, attached: _Attached, patches: np.ndarray, tta: bool) -> np.ndarray:
        model = attached.model
        per_item = model.views * (len(TTA_TRANSFORMS) if tta else 1)
        chunk = max(1, self.max_batch_images // per_item)
        out: list[np.ndarray] = []
        start = 0
        with torch.inference_mode():
            while start < len(patches):
                batch = torch.from_numpy(patches[start:start + chunk]).to(self.device)
                try:
                    with self._activate(attached):
                        out.append(self._forward_view_logits(model, batch, tta).cpu().numpy())
                except torch.cuda.OutOfMemoryError:
                    if len(batch) == 1 and self.device.type == "cpu":
                        raise
                    chunk = self._after_oom(len(batch))
                    continue
                start += len(batch)
        return np.concatenate(out) if out else np.zeros((0, model.views), dtype=np.float32)

    def _after_oom(self, chunk: int) -> int:
        """Halve the failed batch after a CUDA out-of-memory; below one nodule, move to CPU."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if chunk > 1:
            log.warning("CUDA out of memory: retrying with %d nodules per batch", chunk // 2)
            return chunk // 2
        warnings.warn("CUDA out of memory even for one nodule: the scoring engine continues on the CPU",
                      RuntimeWarning, stacklevel=3)
        self.to(torch.device("cpu"))
        return chunk

    def to(self, device: torch.device) -> ScoringEngine:
        """Move every loaded backbone and adapter to ``device``."""
        self.device = torch.device(device)
        for attached in self._adapters.values():
            attached.model.to(self.device)
        for backbone in self._backbones.values():
            backbone.vit.to(self.device)
        return self

    def score_patches(self, patches: np.ndarray, adapter: str | None = None, tta: bool = True) -> list[dict]:
        """One result per patch: probability, logit, per-view probabilities, label, provenance.

        ``logit`` is the fused logit divided by the adapter's temperature, and
        ``probability`` its sigmoid; ``label`` applies the adapter's threshold.
        """
        attached = self._get(adapter)
        array = self._check_patches(patches, attached)
        manifest = attached.manifest
        view_logits = self._view_logits(attached, array, tta).astype(np.float64) / float(manifest.temperature)
        fused = view_logits.mean(axis=1) if attached.model.fusion == "mean" else view_logits.max(axis=1)
        probabilities = 1.0 / (1.0 + np.exp(-fused))
        view_probabilities = 1.0 / (1.0 + np.exp(-view_logits))
        negative, positive = manifest.label_names
        return [{
            "probability": float(p),
            "logit": float(z),
            "view_probabilities": [float(v) for v in views],
            "label": positive if p >= manifest.threshold else negative,
            "adapter": attached.name,
            "adapter_version": manifest.version_id,
            "random_init": bool(manifest.random_init),
        } for p, z, views in zip(probabilities, fused, view_probabilities)]

    def score(self, image: CTImage, nodules: list[Nodule], adapter: str | None = None,
              tta: bool = True) -> list[dict]:
        """Cut each nodule's patch with the adapter's patch spec and score it."""
        if not nodules:
            return []
        attached = self._get(adapter)
        patches = extract_patches(image, centres_lps(nodules), attached.manifest.spec)
        results = self.score_patches(patches, attached.name, tta)
        for nodule, result in zip(nodules, results):
            result.update(nodule_id=nodule.nodule_id, case_id=nodule.case_id,
                          centre_lps=[float(v) for v in nodule.centre_lps])
        return results

