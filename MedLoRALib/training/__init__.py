"""Training LoRA adapters from local annotations.

Torch-free (``medlora dataset check`` and the Slicer module use them): ``config`` (every
training option, ``TrainConfig``), ``manifest``, ``splits``, ``metrics``, ``reports``,
``progress``, ``augment``. With torch, one job each: ``trainer`` (the run: outputs, model,
stages; ``train()``), ``loop`` (one stage, epoch by epoch), ``schedule`` (optimizer, learning
rate, batch order), ``processes`` (torchrun and stopping), ``checkpoint``, ``evaluation``,
``output`` (the adapter folder) and ``dataset``. Import them explicitly
(``from MedLoRALib.training.trainer import train``).
"""
