"""Training: the settings, the run (phases, loop, step), its directory and metrics, checkpoints,
torchrun's parallel modes, sweeps, DPO and the memory estimate. The commands import it; it imports
model, lora and data."""
