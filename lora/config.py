"""The LoRA hyperparameters, and the one error type of the package."""

import math
from dataclasses import dataclass

from model.errors import UserError

# The linear layers of a Llama block: attention projections and the SwiGLU MLP.
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRAError(UserError, ValueError):
    """An adapter or LoRA setting that cannot be used; the message is one line naming the problem."""


@dataclass
class LoRAConfig:
    r: int = 8  # rank of A (r, in) and B (out, r)
    alpha: float = 16  # the update is scaled by alpha / r, so changing r keeps its size comparable
    dropout: float = 0.05  # dropout on the input of the LoRA path only, never on the frozen path
    # Module-name suffixes ("q_proj" or "self_attn.q_proj" or a full name), "all-linear" (every
    # nn.Linear but lm_head), or, as PEFT allows, another string read as a regex that must match
    # the whole module name.
    targets: list[str] | str = "all-linear"
    rslora: bool = False  # rank-stabilised LoRA (Kalajdzievski 2023): scale by alpha / sqrt(r)
    dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output row (PEFT's use_dora)
    base_model_name_or_path: str | None = None  # recorded in adapter_config.json

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise LoRAError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, str):
            self.targets = list(self.targets)
            if not self.targets:
                raise LoRAError("LoRA targets are empty: name modules (q_proj,v_proj,...) or all-linear")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r
