"""LoRA hyper-parameters as data (no torch), so the training configuration, the adapter
manifest and Slicer's process can read and check them without loading a model.

``models.lora`` applies a ``LoraSpec`` to a ViT; this module only describes one. Each field's
``metadata`` names its ``medlora train`` option (see ``training.config``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import ModelError

TARGET_SETS = ("qv", "qkv", "attn", "all")


def option(flag: str, help: str, **argparse_kwargs) -> dict:
    """Field metadata: the command-line flag of a configuration field and its help text."""
    return {"flag": flag, "help": help, **argparse_kwargs}


@dataclass
class LoraSpec:
    """LoRA hyper-parameters (MED-PEFT defaults: rank 8, alpha 32, dropout 0.1, q and v).

    Args:
        rank: LoRA rank r.
        alpha: scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the LoRA input during training.
        targets: ``qv`` (split qkv, adapt q and v), ``qkv`` (fused qkv), ``attn``
            (qkv + proj) or ``all`` (qkv, proj, fc1, fc2).
        use_rslora: rank-stabilised scaling.
        use_dora: weight-decomposed LoRA.
        last_n_blocks: adapt only the last N blocks; the frozen first blocks then run
            without autograd (faster training).
    """

    rank: int = field(default=8, metadata=option("--rank", "LoRA rank r"))
    alpha: float = field(default=32.0, metadata=option("--alpha", "LoRA scaling numerator (scale = alpha / rank)"))
    dropout: float = field(default=0.1, metadata=option("--lora-dropout", "dropout on the LoRA input, in [0, 1)"))
    targets: str = field(default="qv", metadata=option(
        "--targets", "LoRA targets: qv = q and v of a split qkv, as MeLo / MED-PEFT (default)", choices=TARGET_SETS))
    use_rslora: bool = field(default=False, metadata=option("--rslora", "rank-stabilised LoRA scaling"))
    use_dora: bool = field(default=False, metadata=option("--dora", "weight-decomposed LoRA (DoRA)"))
    last_n_blocks: int | None = field(default=None, metadata=option(
        "--last-n-blocks", "adapt only the last N blocks; the blocks before them run without autograd "
        "(faster training; default: every block)", type=int))

    def __post_init__(self) -> None:
        problems = []
        if self.targets not in TARGET_SETS:
            problems.append(f"unknown LoRA target set {self.targets!r}: choose {', '.join(TARGET_SETS)}")
        if int(self.rank) < 1:
            problems.append(f"LoRA rank must be ≥ 1, got {self.rank} (--rank)")
        if not (math.isfinite(float(self.alpha)) and float(self.alpha) > 0):
            problems.append(f"LoRA alpha must be a finite number > 0, got {self.alpha} (--alpha): alpha 0 would "
                            "switch the adapter off and train nothing")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"LoRA dropout must be in [0, 1), got {self.dropout} (--lora-dropout)")
        if self.last_n_blocks is not None and int(self.last_n_blocks) < 1:
            problems.append(f"last_n_blocks must be ≥ 1 (or None for all blocks), got {self.last_n_blocks} "
                            "(--last-n-blocks)")
        if problems:
            raise ModelError("; ".join(problems))
        self.rank = int(self.rank)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.last_n_blocks = None if self.last_n_blocks is None else int(self.last_n_blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
