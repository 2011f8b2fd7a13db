"""A timm-style registry of Vision Transformer backbones, and how their weights are found.

Weights are looked for, in order: the file given by the caller, then the Hugging Face
hub (only when ``pretrained`` and online, or already in the local hub cache). An
adapter's loader also finds local weights by the SHA-256 its manifest records
(``find_local_weights``: ``MedLoRALib/assets`` and ``$MEDLORA_HOME/weights``). Random
initialisation happens only when the caller asks for it explicitly; it is seeded so
that an adapter trained on a random backbone can be scored again on the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..atomic import sha256_file
from ..errors import ModelError

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
RANDOM_INIT_SEED = 0
RANDOM_INIT = "random-init"  # the identity of a seeded random backbone, in place of a SHA-256
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class BackboneConfig:
    """A named backbone: which timm model to build and with what arguments.

    Args:
        name: registry name (``dinov2_vits14``).
        timm_name: the timm model name, with pretrained tag (``vit_small_patch14_dinov2.lvd142m``).
        img_size: the input size (px) the weights were trained at.
        patch_size: ViT patch size (px).
        embed_dim: token width.
        timm_kwargs: extra ``timm.create_model`` arguments (architecture overrides).
        hub_id: Hugging Face repository holding the weights, if any.
        shipped_weights: a weights file in ``MedLoRALib/assets`` used when none is given.
        notes: one line for ``list`` output.
    """

    name: str
    timm_name: str
    img_size: int
    patch_size: int
    embed_dim: int
    timm_kwargs: dict = field(default_factory=dict)
    hub_id: str | None = None
    shipped_weights: str | None = None
    notes: str = ""


@dataclass(frozen=True)
class BackboneInfo:
    """What was actually built; its identity goes into every adapter manifest.

    ``weights_sha256`` is the SHA-256 of the weights file, or ``None`` for a random
    initialisation (then ``random_init`` is True and ``random_init_fingerprint`` is a
    SHA-256 over the seeded initial tensors, so a changed timm init is detected).
    """

    name: str
    timm_name: str
    weights_sha256: str | None
    random_init: bool
    embed_dim: int
    img_size: int
    patch_size: int
    depth: int = 0
    random_init_fingerprint: str | None = None
    weights_path: str | None = None

    @property
    def identity(self) -> str:
        """The string stored as ``backbone_sha256`` in manifests."""
        return RANDOM_INIT if self.random_init else str(self.weights_sha256)


_REGISTRY: dict[str, Callable[[], BackboneConfig]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], BackboneConfig]], Callable[[], BackboneConfig]]:
    """Decorator registering a function that returns a BackboneConfig under ``name``."""

    def decorator(fn: Callable[[], BackboneConfig]) -> Callable[[], BackboneConfig]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def _dinov2(name: str, size: str, dim: int) -> BackboneConfig:
    timm_name = f"vit_{size}_patch14_dinov2.lvd142m"
    return BackboneConfig(name=name, timm_name=timm_name, img_size=518, patch_size=14, embed_dim=dim,
                          hub_id=f"timm/{timm_name}", notes=f"DINOv2 ViT-{size[0].upper()}/14 (LVD-142M)")


@register_backbone("dinov2_vits14")
def _dinov2_vits14() -> BackboneConfig:
    return _dinov2("dinov2_vits14", "small", 384)


@register_backbone("dinov2_vitb14")
def _dinov2_vitb14() -> BackboneConfig:
    return _dinov2("dinov2_vitb14", "base", 768)


@register_backbone("dinov2_vitl14")
def _dinov2_vitl14() -> BackboneConfig:
    return _dinov2("dinov2_vitl14", "large", 1024)


@register_backbone("dinov2_vitg14")
def _dinov2_vitg14() -> BackboneConfig:
    return _dinov2("dinov2_vitg14", "giant", 1536)


@register_backbone("medlora_tiny")
def _medlora_tiny() -> BackboneConfig:
    return BackboneConfig(
        name="medlora_tiny", timm_name="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=96,
        timm_kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3),
        notes="tiny ViT (64 px, 8 px patches, 6 blocks of width 96) for tests and the demo")


@register_backbone("medlora_tiny_synthct")
def _medlora_tiny_synthct() -> BackboneConfig:
    return replace(_medlora_tiny(), name="medlora_tiny_synthct",
                   shipped_weights="medlora_tiny_synthct.safetensors",
                   notes="medlora_tiny pre-trained on synthetic CT structures (scripts/pretrain_tiny_backbone.py): "
                         "the honest stand-in for a pretrained LVM, not a clinical model")


def _timm_config(name: str) -> BackboneConfig:
    """A config for any timm ViT given by its timm name (``timm:<name>`` or bare)."""
    import timm

    timm_name = name.removeprefix("timm:")
    if not timm.is_model(timm_name):
        raise ModelError(f"unknown backbone {name!r}: use one of {', '.join(list_backbones())} "
                         "or the name of a timm Vision Transformer (e.g. timm:vit_base_patch16_224.augreg_in21k)")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    img_size = int(cfg.input_size[-1]) if cfg is not None else 224
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    try:  # built on the meta device: no memory, no init, just the architecture
        probe = timm.create_model(timm_name, pretrained=False, num_classes=0, device="meta")
    except Exception as exc:  # timm raises assorted errors for unbuildable names
        raise ModelError(f"backbone {name!r} cannot be built by timm: {exc}") from exc
    patch_embed = getattr(probe, "patch_embed", None)
    if patch_embed is None or not hasattr(probe, "blocks"):
        raise ModelError(f"backbone {name!r} is a timm {type(probe).__name__}, not a Vision Transformer")
    return BackboneConfig(name=f"timm:{timm_name}", timm_name=timm_name, img_size=img_size,
                          patch_size=int(patch_embed.patch_size[0]), embed_dim=int(probe.embed_dim),
                          hub_id=hub_id, notes="timm model")


def get_backbone_config(name: str) -> BackboneConfig:
    if name in _REGISTRY:
        return _REGISTRY[name]()
    return _timm_config(name)


def _model_img_size(config: BackboneConfig, img_size: int | None) -> tuple[int, dict]:
    """The size to build the ViT at, plus the timm arguments that make patches fit.

    A patch whose side is not a multiple of the ViT patch size is padded by timm's own
    ``dynamic_img_pad`` to whole patches; the position embedding is resampled once to
    that grid (``img_size=`` rounded up), never the image.
    """
    size = int(img_size or config.img_size)
    patch = config.patch_size
    if size < patch:  # one padded token: the ViT would see no image structure at all
        raise ModelError(f"patches of {size} px are smaller than {config.name}'s {patch}-pixel ViT patch: "
                         f"use --pixels {patch} or more (a multiple of {patch} needs no padding)")
    if size % patch == 0:
        return size, {"img_size": size}
    padded = math.ceil(size / patch) * patch
    return size, {"img_size": padded, "dynamic_img_pad": True, "dynamic_img_size": True}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a torch file without unpickling code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in _TORCH_PICKLE_SUFFIXES:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            for key in ("model", "state_dict"):
                if isinstance(data, dict) and isinstance(data.get(key), dict):
                    data = data[key]
            if not isinstance(data, dict):
                raise ModelError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
            return data
    except ModelError:
        raise
    except Exception as exc:  # any parse failure of an untrusted file becomes a user error
        raise ModelError(f"cannot read backbone weights {path}: {exc}. Use a .safetensors file "
                         "(or a .pth/.bin state dict loadable with torch.load(weights_only=True))") from exc
    raise ModelError(f"backbone weights {path}: unsupported file type {path.suffix!r}; "
                     "use .safetensors (preferred) or a .pth/.bin state dict")


def _load_weights(model: nn.Module, path: Path) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)  # timm's own key conversion + pos-embed resampling
    except Exception as exc:  # timm raises assorted errors on foreign checkpoints
        raise ModelError(f"backbone weights {path} do not fit {type(model).__name__}: {exc}") from exc
    if isinstance(model.head, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"backbone weights {path} do not fit {type(model).__name__}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"backbone weights {path} do not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check that the file is for this backbone.")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_weights(hub_id: str) -> Path | None:
    """The weights file from the hub (or its local cache when offline); None if unavailable."""
    import huggingface_hub

    offline = _hub_offline()
    for filename in _HUB_FILES:
        if offline:
            cached = huggingface_hub.try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                return Path(cached)
            continue
        try:
            return Path(huggingface_hub.hf_hub_download(hub_id, filename))
        except Exception as exc:  # network, auth, missing file: try the next, then report
            log.debug("hub download of %s/%s failed: %s", hub_id, filename, exc)
    return None


def local_weights_dirs() -> list[Path]:
    """Folders searched for backbone weights by SHA-256: the package assets, $MEDLORA_HOME/weights."""
    dirs = [ASSETS_DIR]
    home = os.environ.get("MEDLORA_HOME")
    if home:
        dirs.append(Path(home).expanduser() / "weights")
    return dirs


_HASH_CACHE: dict[tuple[str, float, int], str] = {}


def find_local_weights(sha256: str) -> Path | None:
    """A local weights file (.safetensors) whose SHA-256 is ``sha256``, if any."""
    for folder in local_weights_dirs():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            stat = path.stat()
            key = (str(path), stat.st_mtime, stat.st_size)
            if key not in _HASH_CACHE:
                _HASH_CACHE[key] = sha256_file(path)
            if _HASH_CACHE[key] == sha256:
                return path
    return None


def weights_source(identity: str, weights: str | Path | None = None) -> dict:
    """``create_backbone``'s weight arguments for a backbone known by its identity.

    The one place a recorded backbone (an adapter's ``backbone_sha256``) is found again:
    ``weights`` if given, else a local file with that SHA-256 (``find_local_weights``),
    else the shipped file or the hub. ``"random-init"`` gives the seeded random
    initialisation it was trained on.
    """
    if identity == RANDOM_INIT:
        return {"weights": None, "pretrained": False, "allow_random_init": True}
    found = weights if weights is not None else find_local_weights(identity)
    return {"weights": found, "pretrained": True, "allow_random_init": False}


def _weights_help(config: BackboneConfig) -> str:
    hub = (f"or run once online (HF_HUB_OFFLINE unset) to fetch {config.hub_id} into the hub cache, "
           if config.hub_id else "")
    return (f"no weights for backbone {config.name!r}: pass a local weights file "
            f"(--weights FILE.safetensors, or weights= in Python), {hub}"
            "or allow a random initialisation explicitly (tests and demos only: "
            "allow_random_init=True / --allow-random-init)")


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every tensor of a module's state, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def create_backbone(name: str, *, weights: str | Path | None = None, pretrained: bool = True,
                    allow_random_init: bool = False, img_size: int | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build a timm ViT (without classifier head) and load its weights.

    Args:
        name: registry name, ``timm:<name>`` or a bare timm ViT name.
        weights: local weights file (.safetensors preferred).
        pretrained: look for weights in the shipped assets and on the hub when none are given.
        allow_random_init: fall back to a seeded random initialisation instead of failing.
        img_size: input size in px; timm resamples the position embedding to it.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    config = get_backbone_config(name)
    size, size_kwargs = _model_img_size(config, img_size)
    kwargs = {**config.timm_kwargs, **size_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model = timm.create_model(config.timm_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as exc:
            raise ModelError(f"backbone {name!r} ({config.timm_name}) cannot be built as a ViT: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"backbone {name!r} is a timm {type(model).__name__}, not a VisionTransformer; "
                         "MedLoRA adapts ViTs (blocks with attn.qkv)")
    path = Path(weights).expanduser() if weights is not None else None
    if path is None and pretrained and config.shipped_weights:
        path = ASSETS_DIR / config.shipped_weights
    if path is None and pretrained and config.hub_id:
        path = _hub_weights(config.hub_id)
    if path is not None and not path.is_file():
        raise ModelError(f"backbone weights file not found: {path}")

    info_kwargs = dict(name=config.name, timm_name=config.timm_name, embed_dim=int(model.embed_dim),
                       img_size=size, patch_size=int(model.patch_embed.patch_size[0]), depth=len(model.blocks))
    if path is not None:
        _load_weights(model, path)
        info = BackboneInfo(weights_sha256=sha256_file(path), random_init=False, weights_path=str(path), **info_kwargs)
    elif allow_random_init:
        log.warning("backbone %s is randomly initialised: its scores mean nothing clinically", config.name)
        info = BackboneInfo(weights_sha256=None, random_init=True,
                            random_init_fingerprint=state_fingerprint(model), **info_kwargs)
    else:
        raise ModelError(_weights_help(config))
    model.eval()
    return model, info

