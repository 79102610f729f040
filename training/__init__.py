"""Training: the settings (and how they are read), the run (phases, loop, step), its directory and
metrics, checkpoints, torchrun's parallel modes, sweeps, the preference objectives (DPO; ORPO and
SimPO; KTO) and the memory estimate. The commands import it; it imports model, lora and data."""
