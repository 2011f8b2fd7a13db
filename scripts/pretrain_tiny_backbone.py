#!/usr/bin/env python
"""Pre-train a ViT on synthetic CT (by default the tiny one, written to MedLoRALib/assets/medlora_tiny_synthct.safetensors).

    HF_HUB_OFFLINE=1 python scripts/pretrain_tiny_backbone.py            # the shipped file
    HF_HUB_OFFLINE=1 python scripts/pretrain_tiny_backbone.py --steps 1 --out /tmp/smoke.safetensors
    HF_HUB_OFFLINE=1 python scripts/pretrain_tiny_backbone.py --backbone dinov2_vits14 --pixels 56 \
        --steps 600 --lr 5e-4 --warmup-fraction 0.1 --threads 1 --out vits14_synthct_56px.safetensors

See MedLoRALib/training/pretrain.py for the task and the data.
"""

import sys

from MedLoRALib.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
