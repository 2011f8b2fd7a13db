#!/usr/bin/env python
"""Pre-train the tiny ViT on synthetic CT and write MedLoRALib/assets/medlora_tiny_synthct.safetensors.

    HF_HUB_OFFLINE=1 python scripts/pretrain_tiny_backbone.py            # the shipped file
    HF_HUB_OFFLINE=1 python scripts/pretrain_tiny_backbone.py --steps 1 --out /tmp/smoke.safetensors

See MedLoRALib/training/pretrain.py for the task and the data.
"""

import sys

from MedLoRALib.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
