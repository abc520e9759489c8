"""Quantization-aware finetuning: the one training engine QuEST, BinaryDM and ternary distillation
share. The quantized student is trained against its FP self (data-free distillation on the
teacher's trajectories or re-noised latents, or real images with the diffusion loss), only what
``finetune.train`` selects trains, a held-out loss picks the state kept, and the state is
checkpointed for exact resume.

- :mod:`~diffq.finetune.select`: what trains (rules over roles and names, by kind), the teacher's copies;
- :mod:`~diffq.finetune.lora`: low-rank FP adapters, merged before export or kept as a side branch;
- :mod:`~diffq.finetune.data`: training batches from the teacher's trajectory pool;
- :mod:`~diffq.finetune.losses`: extra loss terms as hook objects;
- :mod:`~diffq.finetune.engine`: the loop, optimiser, schedule, validation and the best state, checkpoints, DDP;
- :mod:`~diffq.finetune.stage`: finetuning as a job stage.
"""
