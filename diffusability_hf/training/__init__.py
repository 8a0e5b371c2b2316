"""Training: checkpoints and resume, launch and accelerator set-up, the step and its meters, FSDP, EMA, LoRA and
the paper's presets."""
