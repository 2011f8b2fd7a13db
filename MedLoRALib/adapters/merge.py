"""Merge LoRA adapters trained at different sites into one adapter (torch).

What is merged is each adapted layer's **weight update** ΔW = B·A·scale (scale = alpha / r,
or alpha / √r with rsLoRA), not the A and B matrices: mean(B_i)·mean(A_i) is not the mean of
B_i·A_i (the cross terms B_i·A_j appear, and two adapters that learnt the same update in a
different basis — A → R·A, B → B·R⁻¹ — would cancel). Per layer:

* ``avg``: ΔW = mean of the parents' ΔW (task arithmetic with equal weights);
* ``ties``: TIES merging (Yadav et al. 2023) with peft's own ``peft.utils.merge_utils.ties``
  on the parents' ΔW: keep each parent's ``density`` largest-magnitude entries, elect each
  entry's sign by the summed mass, and average only the entries that agree with it.

The merged ΔW is then factorised back into LoRA form by a truncated SVD, ΔW ≈ U_r·S_r·V_rᵀ,
B = U_r·√S_r / √scale, A = √S_r·V_rᵀ / √scale (peft's ``add_weighted_adapter`` "svd" route).
Why the SVD and not rank concatenation ("cat": stack the parents' B and A, exact for ``avg``
but rank Σr_i): the merged adapter keeps the parents' rank, size and LoRA spec, so it is an
ordinary adapter the engine attaches, hot-swaps and ships like any other, and ``ties`` has no
low-rank form at all. The price is a truncation error, recorded per merge in the manifest
(``merge.relative_truncation_error``: ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F, largest layer and overall);
``rank`` ≥ Σ r_i makes ``avg`` exact, ``rank`` = min(d_out, d_in) makes any merge exact.

The classifier head and the final norm each adapter carries are **averaged** (both methods):
they are small dense layers trained from the same initial head, not low-rank updates, and
TIES's sparsification has no meaning for a 1×d head. Threshold and temperature are the mean
of the parents' — the merged adapter is not recalibrated, and its manifest carries no
validation metrics: evaluate it on local data before trusting its probabilities.

Only adapters that read the same patches of the same backbone (``ensemble.check_compatible``)
and adapt the same layers (same LoRA targets and blocks) can be merged.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..atomic import replace_dir, staging_name
from ..ensemble import check_compatible
from ..errors import AdapterError, OutputError, os_error_reason
from ..locks import OutputLock
from ..lora_spec import LoraSpec
from ..outputs import ADAPTER, check_replaceable, write_marker
from .archive import HEAD_WEIGHTS, LORA_CONFIG, LORA_WEIGHTS, AdapterFiles, read_checked, write_adapter
from .manifest import AdapterManifest, manifest_sha256
from .package import lora_spec_of
from .store import check_name

METHODS = ("avg", "ties")
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class MergeOptions:
    """How to merge.

    Args:
        method: ``avg`` (mean of the updates) or ``ties`` (TIES sign-consensus merging).
        density: for ``ties``, the fraction of each parent's update entries kept (0 < density ≤ 1).
        rank: LoRA rank of the merged adapter; None = the largest parent rank.
    """

    method: str = "avg"
    density: float = 0.5
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdapterError(f"unknown merge method {self.method!r}: use {' or '.join(METHODS)}")
        if not (isinstance(self.density, (int, float)) and 0.0 < float(self.density) <= 1.0):
            raise AdapterError(f"--density must be in (0, 1] (the fraction of each update kept by TIES), "
                               f"got {self.density}")
        if self.rank is not None and int(self.rank) < 1:
            raise AdapterError(f"--rank must be ≥ 1, got {self.rank}")


def lora_scale(spec: LoraSpec, rank: int | None = None) -> float:
    """peft's LoRA scaling for ``spec`` at ``rank`` (default its own)."""
    rank = rank or spec.rank
    return spec.alpha / (math.sqrt(rank) if spec.use_rslora else rank)


def _tensors(adapter: AdapterFiles, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(adapter.contents[name])
    except Exception as exc:  # read_checked has vetted the header; anything left is damage
        raise AdapterError(f"adapter {adapter.source}: {name} cannot be read: {exc}") from exc


def lora_factors(adapter: AdapterFiles) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Each adapted layer's (A, B), keyed by the layer's state-dict prefix, and the adapter's LoRA scale."""
    state = _tensors(adapter, LORA_WEIGHTS)
    layers = sorted(k[:-len(_A)] for k in state if k.endswith(_A))
    if not layers or any(f"{layer}{_B}" not in state for layer in layers):
        raise AdapterError(f"adapter {adapter.source}: {LORA_WEIGHTS} does not hold LoRA A and B pairs")
    return {layer: (state[f"{layer}{_A}"], state[f"{layer}{_B}"]) for layer in layers}, lora_scale(
        lora_spec_of(adapter.manifest))


def update(factors: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """A layer's weight update ΔW = B·A·scale, in float64."""
    a, b = factors
    return b.double() @ a.double() * scale


def lora_updates(adapter: AdapterFiles) -> dict[str, torch.Tensor]:
    """Every adapted layer's update ΔW = B·A·scale (float64), keyed by the layer's state-dict prefix."""
    factors, scale = lora_factors(adapter)
    return {layer: update(pair, scale) for layer, pair in factors.items()}


def combine_updates(updates: list[torch.Tensor], options: MergeOptions) -> torch.Tensor:
    """One layer's merged update from the parents' updates."""
    if options.method == "avg":
        return torch.stack(updates).mean(dim=0)
    from peft.utils.merge_utils import ties

    with warnings.catch_warnings():  # peft warns that density 1 prunes nothing: that is what was asked
        warnings.simplefilter("ignore", UserWarning)
        return ties(updates, torch.ones(len(updates), dtype=updates[0].dtype), float(options.density))


def factorise(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error): B·A·scale is the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if b.shape[1] < rank:  # a layer narrower than the rank: pad with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
    norm = float(torch.linalg.norm(s))
    error = float(torch.linalg.norm(s[rank:])) / norm if norm > 0 else 0.0
    return a, b, error


def _check_mergeable(parents: list[AdapterFiles]) -> None:
    if len(parents) < 2:
        raise AdapterError(f"merging needs at least two adapters, got {len(parents)}")
    for parent in parents:
        manifest = parent.manifest
        if manifest.mode != "lora":
            raise AdapterError(f"adapter {parent.source} is a {manifest.mode!r} adapter: merging combines LoRA "
                               "updates, so every adapter must be a 'lora' adapter")
        if lora_spec_of(manifest).use_dora:
            raise AdapterError(f"adapter {parent.source} is a DoRA adapter: its update is not B·A alone "
                               "(a learnt magnitude rescales each column), so it cannot be merged as LoRA")
    check_compatible({f"{p.manifest.name} ({p.source})": p.manifest for p in parents})
    first, first_spec = parents[0], lora_spec_of(parents[0].manifest)
    seen = {first.manifest.version_id: first.source}
    for parent in parents[1:]:
        spec = lora_spec_of(parent.manifest)
        if (spec.targets, spec.last_n_blocks) != (first_spec.targets, first_spec.last_n_blocks):
            raise AdapterError(
                f"adapters {first.source} and {parent.source} adapt different layers (LoRA targets "
                f"{first_spec.targets!r}, last blocks {first_spec.last_n_blocks} vs {spec.targets!r}, "
                f"{spec.last_n_blocks}): merging adds updates layer by layer, so both must adapt the same layers")
        if first.manifest.fusion != parent.manifest.fusion:
            raise AdapterError(f"adapters {first.source} and {parent.source} fuse their views differently "
                               f"({first.manifest.fusion} vs {parent.manifest.fusion}): they cannot be merged")
        version = parent.manifest.version_id
        if version in seen:
            raise AdapterError(f"{parent.source} holds the same weights as {seen[version]} (version {version}): "
                               "an adapter given twice would count double in the merge; give each adapter once")
        seen[version] = parent.source


def merged_contents(parents: list[AdapterFiles], options: MergeOptions) -> tuple[dict[str, bytes], LoraSpec, dict]:
    """The merged adapter's weight files, its LoRA spec and the merge record for its manifest."""
    _check_mergeable(parents)
    factors = [lora_factors(p) for p in parents]  # ΔW is formed one layer at a time: a ViT-g's would not fit
    layers = list(factors[0][0])
    for parent, (pairs, _scale) in zip(parents[1:], factors[1:]):
        if set(pairs) != set(layers):
            odd = sorted(set(pairs) ^ set(layers))
            raise AdapterError(f"adapters {parents[0].source} and {parent.source} adapt different layers "
                               f"(e.g. {odd[0]}): they cannot be merged layer by layer")
    specs = [lora_spec_of(p.manifest) for p in parents]
    rank = int(options.rank or max(s.rank for s in specs))
    widest = max(min(factors[0][0][layer][1].shape[0], factors[0][0][layer][0].shape[1]) for layer in layers)
    if rank > widest:
        raise AdapterError(f"--rank {rank} exceeds the adapted layers' size ({widest}); a rank of {widest} "
                           "already represents every merged update exactly")
    spec = replace(specs[0], rank=rank)
    scale = lora_scale(spec)
    dtype = factors[0][0][layers[0]][0].dtype
    state, errors, squared, total = {}, {}, 0.0, 0.0
    for layer in layers:
        delta = combine_updates([update(pairs[layer], scale_i) for pairs, scale_i in factors], options)
        a, b, error = factorise(delta, rank, scale)
        state[f"{layer}{_A}"], state[f"{layer}{_B}"] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        errors[layer] = error
        norm = float(torch.linalg.norm(delta)) ** 2
        squared += error ** 2 * norm
        total += norm
    files = {LORA_WEIGHTS: save_safetensors(state, metadata={"format": "pt"}),
             HEAD_WEIGHTS: save_safetensors(_average_heads(parents), metadata={"format": "pt"})}
    config = _lora_config(parents[0], spec)
    if config is not None:
        files[LORA_CONFIG] = config
    record = {"method": options.method, "density": float(options.density) if options.method == "ties" else None,
              "rank": rank, "update": "per-layer dW = B @ A * scale, truncated SVD back to the rank",
              "heads": "averaged",
              "relative_truncation_error": {"max_layer": round(max(errors.values()), 6),
                                            "overall": round(math.sqrt(squared / total) if total else 0.0, 6)}}
    return files, spec, record


def _average_heads(parents: list[AdapterFiles]) -> dict[str, torch.Tensor]:
    heads = [_tensors(p, HEAD_WEIGHTS) for p in parents]
    for parent, head in zip(parents[1:], heads[1:]):
        if {k: v.shape for k, v in head.items()} != {k: v.shape for k, v in heads[0].items()}:
            raise AdapterError(f"adapters {parents[0].source} and {parent.source} have different heads "
                               f"({sorted(heads[0])} vs {sorted(head)}): they cannot be merged")
    return {k: torch.stack([h[k].double() for h in heads]).mean(dim=0).to(heads[0][k].dtype).contiguous()
            for k in heads[0]}


def _lora_config(parent: AdapterFiles, spec: LoraSpec) -> bytes | None:
    """The first parent's peft ``adapter_config.json`` with the merged rank (informational: the
    engine builds the peft config from the manifest's LoRA spec)."""
    raw = parent.contents.get(LORA_CONFIG)
    if raw is None:
        return None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"adapter {parent.source}: {LORA_CONFIG} is not valid JSON: {exc}") from exc
    config.update(r=spec.rank, lora_alpha=spec.alpha)
    return (json.dumps(config, indent=2) + "\n").encode()


def merged_manifest(parents: list[AdapterFiles], spec: LoraSpec, record: dict, name: str) -> AdapterManifest:
    """The merged adapter's manifest: the parents' shared facts, their identities and the merge."""
    first = parents[0].manifest
    count = len(parents)
    return AdapterManifest(
        name=name, backbone=first.backbone, backbone_sha256=first.backbone_sha256, random_init=first.random_init,
        random_init_fingerprint=first.random_init_fingerprint, patch_spec=dict(first.patch_spec),
        lora=spec.to_dict(), mode="lora", label_names=list(first.label_names), fusion=first.fusion,
        tta=first.tta if len({p.manifest.tta for p in parents}) == 1 else None,  # parents' common set, else d8
        threshold=sum(float(p.manifest.threshold) for p in parents) / count,
        temperature=sum(float(p.manifest.temperature) for p in parents) / count,
        training={"merged_from": [p.manifest.name for p in parents],
                  "note": "made by merging, not by training: not validated or recalibrated; threshold and "
                          "temperature are the parents' means"},
        description=f"{record['method']} merge of " + ", ".join(p.manifest.name for p in parents),
        parents=[{"name": p.manifest.name, "version_id": p.manifest.version_id,
                  "manifest_sha256": manifest_sha256(p.manifest)} for p in parents],
        merge=record)


def merge_adapters(paths: list[str | Path], out: str | Path, *, method: str = "avg", density: float = 0.5,
                   rank: int | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapters at ``paths`` (folders or ``.zip``) into a new adapter folder ``out``.

    ``out`` must be new, or (with ``overwrite``) an adapter folder MedLoRA wrote; it is locked
    while written and replaced in one step (``outputs.check_replaceable``, ``atomic.replace_dir``),
    so a failed merge leaves it as it was. Raises ``AdapterError`` for parents that cannot be
    merged, ``OutputError`` for an output that may not be written.
    """
    options = MergeOptions(method=method, density=density, rank=rank)
    out = Path(out).expanduser()
    if out.suffix.lower() == ".zip":
        raise OutputError(f"--out {out}: a merged adapter is written as a folder; name a folder (store it with "
                          "`medlora adapters import`, then `medlora adapters export` makes a .zip)")
    name = check_name(name or out.name)
    sources = [Path(p).expanduser() for p in paths]
    check_replaceable(out, option="--out", inputs=sources, kind=ADAPTER)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} already holds an adapter: choose another folder, or pass --overwrite "
                          "to replace it")
    parents = [read_checked(p) for p in sources]
    files, spec, record = merged_contents(parents, options)
    manifest = merged_manifest(parents, spec, record, name)
    with OutputLock(out, activity="merged"):
        check_replaceable(out, option="--out", inputs=sources, kind=ADAPTER)  # again: it may have changed
        staging = staging_name(out, "merge")
        try:
            write_adapter(manifest, files, staging)
            write_marker(staging, ADAPTER)
            out.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(staging, out)
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(f"could not write the merged adapter to {out}: {os_error_reason(exc)}. "
                              + ("The adapter there is unchanged. " if out.exists() else "")
                              + "Free space or choose a writable --out.") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out
