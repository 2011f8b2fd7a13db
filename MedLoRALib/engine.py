"""The scoring engine: one backbone kept loaded, many adapters attached (MeLo), nodules scored.

LoRA adapters for the same backbone (same weights, same input size, same qkv layout)
share one backbone: each becomes a named peft adapter on it plus its own head and final
norm, so switching is ``set_adapter`` — no backbone reload. An adapter for another
backbone gets a second backbone kept beside the first (``status`` lists them); a
``full`` fine-tuned adapter carries its whole network and is kept on its own. Linear
probes share an unsplit backbone and run with LoRA disabled.

Scores are deterministic on CPU: the same patches in the same call give bit-identical
results. Test-time augmentation (on by default) averages the logits of in-plane flips/90°
rotations of every plane, all variants and views in one forward pass. ``tta=True`` uses each
adapter's own set (its manifest's ``tta``; ``d8``, all eight, for adapters that record none),
``False`` none, and a count or set name (``tta.TTA_SETS``) overrides it; every result names the
set it was scored with (``"tta"``).

Precision (``device.choose_precision``): fp32 on the CPU unless asked otherwise, so scores
are those of the trained model; ``int8`` scores with a quantised copy of each adapter's
network, made on first use and kept until the adapter is detached (docs/perf.md).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .adapters.archive import AdapterFiles, read_checked
from .adapters.manifest import AdapterManifest
from .adapters.package import build_model_for, lora_spec_of
from .adapters.shared import SharedBackbone, backbone_key
from .adapters.store import AdapterStore, check_name, resolve_adapter
from .device import choose_device, choose_precision, precision_context, prepare_for_precision
from .ensemble import check_compatible, combine
from .errors import AdapterError, PatchError
from .image import CTImage
from .models.backbones import create_backbone
from .models.classifier import NoduleClassifier
from .models.lora import frozen_prefix_blocks
from .nodule import Nodule, centres_lps
from .patches import extract_patches
from .tta import TTA_SETS, ensemble_tta, resolve_tta

log = logging.getLogger(__name__)


@dataclass
class _Attached:
    name: str
    manifest: AdapterManifest
    model: NoduleClassifier
    backbone: SharedBackbone | None  # None: a full fine-tuned model that owns its network
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
        precision: ``fp32``, ``bf16``, ``int8`` or None/``auto`` (see ``choose_precision``);
            a score call may ask for another.
    """

    def __init__(self, device: str | torch.device | None = None, max_batch_images: int = 288,
                 store: AdapterStore | None = None, precision: str | None = None) -> None:
        self.device = choose_device(None if device is None else str(device))
        self.precision = choose_precision(self.device, precision)
        self._precision_request = precision
        self._fast_models: dict[tuple[str, str], torch.nn.Module] = {}  # (adapter, precision) -> prepared copy
        self.max_batch_images = int(max_batch_images)
        self.store = store or AdapterStore()
        self._adapters: dict[str, _Attached] = {}
        self._backbones: dict[tuple, SharedBackbone] = {}
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
        adapter = read_checked(location)
        manifest = adapter.manifest
        name = check_name(name or manifest.name)
        if name in self._adapters:
            self.detach_adapter(name)
        if manifest.random_init:
            log.warning("adapter %s was trained on a randomly initialised backbone: its scores are flagged "
                        "random_init and mean nothing clinically", name)
        if manifest.mode == "full":  # carries its whole network: a model of its own
            model = build_model_for(adapter, weights).to(self.device)
            self.backbone_loads += 1
            attached = _Attached(name, manifest, model, None)
        else:
            backbone = self._shared_backbone(adapter, weights)
            lora_name = f"adapter{next(self._lora_ids)}" if manifest.mode == "lora" else None
            model = backbone.attach(adapter, lora_name, self.device)
            backbone.users.add(name)
            attached = _Attached(name, manifest, model, backbone, lora_name)
        self._adapters[name] = attached
        self.active = name
        return manifest

    def load_backbone(self, name: str, weights: str | Path | None = None, pixels: int | None = None,
                      split_qkv: bool = True, allow_random_init: bool = False) -> dict:
        """Load a backbone ahead of its adapters (e.g. at engine start), so attaching is fast.

        Adapters attached later share it when they name the same backbone, weights, patch
        pixels and q/v split (the ``qv`` LoRA targets split the fused qkv).
        """
        vit, info = create_backbone(name, weights=weights, allow_random_init=allow_random_init, img_size=pixels)
        key = SharedBackbone.key_of(info, split_qkv)
        if key not in self._backbones:
            self._backbones[key] = SharedBackbone.prepare(vit, info, split_qkv, self.device)
            self.backbone_loads += 1
        return {"backbone": info.name, "weights_sha256": info.weights_sha256, "random_init": info.random_init,
                "img_size": info.img_size, "split_qkv": split_qkv}

    def _shared_backbone(self, adapter: AdapterFiles, weights: str | Path | None) -> SharedBackbone:
        """The loaded backbone ``adapter`` can share, loading it on first use."""
        key = backbone_key(adapter.manifest)
        if key not in self._backbones:
            self._backbones[key] = SharedBackbone.for_adapter(adapter, weights, self.device)
            self.backbone_loads += 1
        return self._backbones[key]

    def set_adapter(self, name: str) -> str:
        self.active = self._get(name).name
        return self.active

    def detach_adapter(self, name: str) -> list[str]:
        attached = self._get(name)
        del self._adapters[attached.name]
        self._drop_fast_models(attached.name)
        backbone = attached.backbone
        if backbone is not None:
            backbone.users.discard(attached.name)
            if not backbone.users:
                self._backbones.pop(backbone.key, None)  # nothing uses it: free the memory
            elif attached.lora_name:
                backbone.remove_lora(attached.lora_name)
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

    def _drop_fast_models(self, name: str | None = None) -> None:
        for key in [k for k in self._fast_models if name is None or k[0] == name]:
            del self._fast_models[key]

    def _model_at(self, attached: _Attached, precision: str):
        """(model, forward context) that scores ``attached`` at ``precision``."""
        if precision != "int8":
            return attached.model, self._activate(attached)
        key = (attached.name, precision)
        if key not in self._fast_models:
            self._fast_models[key] = prepare_for_precision(attached.model, precision, attached.lora_name)
        return self._fast_models[key], nullcontext()

    def _activate(self, attached: _Attached):
        """Make the adapter's LoRA the active one on its backbone; returns the forward context."""
        return nullcontext() if attached.backbone is None else attached.backbone.activate(attached.lora_name)

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

    def tta_set(self, tta: bool | int | str = True, adapter: str | None = None) -> str:
        """The TTA set a score call with ``tta`` uses for ``adapter`` (True: the adapter's own set)."""
        resolve_tta(tta)  # a bad setting is refused whichever adapter is asked about
        return resolve_tta(tta, self._get(adapter).manifest.default_tta)

    def _forward_view_logits(self, model: NoduleClassifier, batch: torch.Tensor, tta_set: str,
                             precision: str = "fp32") -> torch.Tensor:
        """(B, views) logits, averaged over the set's TTA variants (all variants in one forward pass)."""
        variants = TTA_SETS[tta_set]
        stacked = torch.cat([apply_tta(batch, k, flip) for k, flip in variants])
        with precision_context(self.device, precision):
            logits = model.view_logits(stacked).float()
        return logits.reshape(len(variants), batch.shape[0], -1).mean(dim=0)

    def _view_logits(self, attached: _Attached, patches: np.ndarray, tta_set: str,
                     precision: str | None = None) -> np.ndarray:
        requested = precision
        precision = choose_precision(self.device, requested) if requested else self.precision
        model = attached.model
        per_item = model.views * len(TTA_SETS[tta_set])
        chunk = max(1, self.max_batch_images // per_item)
        out: list[np.ndarray] = []
        start = 0
        with torch.inference_mode():
            while start < len(patches):
                batch = torch.from_numpy(patches[start:start + chunk]).to(self.device)
                try:
                    runner, context = self._model_at(attached, precision)
                    with context:
                        out.append(self._forward_view_logits(runner, batch, tta_set, precision).cpu().numpy())
                except torch.cuda.OutOfMemoryError:
                    if len(batch) == 1 and self.device.type == "cpu":
                        raise
                    chunk = self._after_oom(len(batch))
                    precision = choose_precision(self.device, requested) if requested else self.precision
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
        request = None if self._precision_request == "int8" and self.device.type != "cpu" else self._precision_request
        self.precision = choose_precision(self.device, request)
        self._drop_fast_models()
        for attached in self._adapters.values():
            attached.model.to(self.device)
        for backbone in self._backbones.values():
            backbone.vit.to(self.device)
        return self

    def score_patches(self, patches: np.ndarray, adapter: str | None = None, tta: bool | int | str = True,
                      precision: str | None = None) -> list[dict]:
        """One result per patch: probability, logit, per-view probabilities, label, provenance.

        ``tta``: True (the adapter's own set, ``AdapterManifest.default_tta``), False (none), a
        count or a set name (``tta.resolve_tta``); ``tta`` in each result names the set used.
        ``logit`` is the fused logit divided by the adapter's temperature, and
        ``probability`` its sigmoid; ``label`` applies the adapter's threshold.
        ``precision`` overrides the engine's for this call (see ``choose_precision``).
        """
        tta_set = self.tta_set(tta, adapter)
        attached = self._get(adapter)
        array = self._check_patches(patches, attached)
        return self._results(attached, self._view_logits(attached, array, tta_set, precision), tta_set)

    def _results(self, attached: _Attached, view_logits: np.ndarray, tta_set: str) -> list[dict]:
        """Results of (N, views) raw logits: the adapter's temperature, fusion, threshold and provenance."""
        manifest = attached.manifest
        view_logits = view_logits.astype(np.float64) / float(manifest.temperature)
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
            "tta": tta_set,
        } for p, z, views in zip(probabilities, fused, view_probabilities)]

    def score(self, image: CTImage, nodules: list[Nodule], adapter: str | None = None,
              tta: bool | int | str = True, precision: str | None = None) -> list[dict]:
        """Cut each nodule's patch with the adapter's patch spec and score it."""
        resolve_tta(tta)  # a bad setting fails before the crop
        if not nodules:
            return []
        attached = self._get(adapter)
        patches = extract_patches(image, centres_lps(nodules), attached.manifest.spec)
        results = self.score_patches(patches, attached.name, tta, precision)
        for nodule, result in zip(nodules, results):
            result.update(nodule_id=nodule.nodule_id, case_id=nodule.case_id,
                          centre_lps=[float(v) for v in nodule.centre_lps])
        return results

    # --- ensembles: several adapters, one answer with its spread ----------------------------
    def ensemble_manifests(self, adapters: Sequence[str]) -> dict[str, AdapterManifest]:
        """The members' manifests by name, refused unless they read the same patches of one backbone.

        ``full`` fine-tuned adapters may be members: they run their own network, but their
        backbone name, starting weights and patch spec must match the others'.
        """
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise AdapterError(f"an ensemble is a list of adapter names, got {adapters!r}")
        names = [self._get(name).name for name in adapters]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise AdapterError(f"adapter {repeated[0]!r} is named twice in the ensemble: each member counts once "
                               "in the mean and the spread")
        manifests = {name: self._adapters[name].manifest for name in names}
        check_compatible(manifests)
        return manifests

    def score_patches_ensemble(self, patches: np.ndarray, adapters: Sequence[str], tta: bool | int | str = True,
                               precision: str | None = None) -> list[dict]:
        """Score patches with every member on the loaded backbone(s) and combine (``ensemble.combine``).

        Shared: the loaded backbone weights, the patches (checked once) and, where no member adapts
        them, the leading ViT blocks (``shared_prefix_blocks``); each member's probability equals
        scoring it alone (same batches, same operations). One result per patch: ``probability`` (the members' mean), ``spread`` (their standard
        deviation), ``disagree`` (the members' own labels differ), ``label`` at ``threshold`` (the
        members' mean threshold), ``adapters`` and ``members`` (each member's probability, logit, label).
        """
        manifests = self.ensemble_manifests(adapters)
        members = [self._adapters[name] for name in manifests]
        sets = {m.name: self.tta_set(tta, m.name) for m in members}  # each member its own set under tta=True
        array = self._check_patches(patches, members[0])
        shared = (self._shared_prefix_view_logits(members, array, sets[members[0].name], precision)
                  if len(set(sets.values())) == 1 else None)
        per_member = {m.name: self._results(m, shared[m.name], sets[m.name]) if shared is not None
                      else self.score_patches(array, m.name, sets[m.name], precision) for m in members}
        return _ensemble_results(per_member, manifests, ensemble_tta(list(sets.values())))

    def shared_prefix_blocks(self, adapters: Sequence[str]) -> int:
        """How many leading ViT blocks an ensemble computes once for all its members.

        Non-zero only when every member sits on one loaded backbone and none adapts those blocks
        (LoRA on the last N blocks only, or a linear probe): LoRA changes every block it sits on,
        so with LoRA on every block (the default) only the patch embedding precedes it, and that
        (about 1 % of the forward) is not worth a separate path.
        """
        members = [self._get(name) for name in adapters]
        if len(members) < 2 or any(m.backbone is None for m in members) or len({id(m.backbone) for m in members}) > 1:
            return 0
        depth = len(members[0].model.vit.blocks)
        return min(depth if m.lora_name is None else frozen_prefix_blocks(depth, lora_spec_of(m.manifest))
                   for m in members)

    def _shared_prefix_view_logits(self, members: list[_Attached], array: np.ndarray, tta_set: str,
                                   precision: str | None) -> dict[str, np.ndarray] | None:
        """Each member's (N, views) raw logits with the blocks no member adapts run once per batch.

        The batches, TTA variants (one set for all members) and precision are those of
        ``_view_logits``, so each member's logits are those it gives alone. ``None`` where nothing
        is shared (or for int8 models, or after a CUDA out-of-memory): then each member runs on its own.
        """
        prefix = self.shared_prefix_blocks([m.name for m in members])
        precision = choose_precision(self.device, precision) if precision else self.precision
        if prefix == 0 or precision == "int8":
            return None
        variants = TTA_SETS[tta_set]
        first = members[0].model
        chunk = max(1, self.max_batch_images // (first.views * len(variants)))
        out: dict[str, list[np.ndarray]] = {m.name: [] for m in members}
        try:
            with torch.inference_mode(), precision_context(self.device, precision):
                for start in range(0, len(array), chunk):
                    batch = torch.from_numpy(array[start:start + chunk]).to(self.device)
                    stacked = torch.cat([apply_tta(batch, k, flip) for k, flip in variants])
                    with self._activate(members[0]):  # no member has LoRA in the shared blocks
                        tokens = first.tokens(first._images(stacked), prefix)
                    for member in members:
                        with self._activate(member):
                            logits = member.model.head(member.model.features_from(tokens, prefix)).float()
                        logits = logits.reshape(len(variants), batch.shape[0], -1).mean(dim=0)
                        out[member.name].append(logits.cpu().numpy())
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        return {name: np.concatenate(parts) if parts else np.zeros((0, first.views), np.float32)
                for name, parts in out.items()}

    def score_ensemble(self, image: CTImage, nodules: list[Nodule], adapters: Sequence[str],
                       tta: bool | int | str = True, precision: str | None = None) -> list[dict]:
        """Cut each nodule's patch once (the members share a patch spec) and score it with every member."""
        manifests = self.ensemble_manifests(adapters)
        if not nodules:
            return []
        patches = extract_patches(image, centres_lps(nodules), next(iter(manifests.values())).spec)
        results = self.score_patches_ensemble(patches, list(manifests), tta, precision)
        for nodule, result in zip(nodules, results):
            result.update(nodule_id=nodule.nodule_id, case_id=nodule.case_id,
                          centre_lps=[float(v) for v in nodule.centre_lps])
        return results

    # --- explanations ---------------------------------------------------------------------
    def explain_patches(self, patches: np.ndarray, method: str = "rollout",
                        adapter: str | None = None) -> tuple[np.ndarray, int]:
        """Saliency maps (N, planes, H, W) on each patch's planes, and the patch pixels per map cell.

        ``method``: ``rollout`` (attention rollout, one cell per ViT patch) or ``gradxinput``
        (one cell per pixel). Map them back into the CT with ``explain.volume.saliency_volume``.
        """
        from .explain.saliency import cell_pixels, saliency_maps

        attached = self._get(adapter)
        array = self._check_patches(patches, attached)
        with self._activate(attached):
            return saliency_maps(attached.model, array, method), cell_pixels(attached.model, method)


MEMBER_FIELDS = ("adapter", "adapter_version", "probability", "logit", "label", "random_init", "tta")


def _ensemble_results(per_member: dict[str, list[dict]], manifests: dict[str, AdapterManifest],
                      tta_set: str) -> list[dict]:
    """Each patch's members' results combined by ``ensemble.combine`` (one rule for every report)."""
    names = list(manifests)
    probabilities = np.array([[r["probability"] for r in per_member[name]] for name in names])
    scores = combine(probabilities, [manifests[name].threshold for name in names])
    labels = scores.labels(next(iter(manifests.values())).label_names)
    random_init = any(m.random_init for m in manifests.values())
    return [{
        "probability": float(scores.probability[i]),
        "spread": float(scores.spread[i]),
        "disagree": bool(scores.disagree[i]),
        "label": labels[i],
        "threshold": scores.threshold,
        "adapter": "+".join(names),
        "adapters": names,
        "adapter_version": "+".join(manifests[name].version_id for name in names),
        "random_init": random_init,
        "tta": tta_set,
        "members": [{key: per_member[name][i][key] for key in MEMBER_FIELDS} for name in names],
    } for i in range(probabilities.shape[1])]
