"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) by hand, with adapters in PEFT's format.

    config.py   LoRAConfig (r, alpha, dropout, targets, rslora) and LoRAError
    layer.py    LoRALinear: frozen W0 (maybe NF4) + scaling * B A; merge_weight, the pure merge
    fused.py    LoRAGroup: layers that read one input, backward written out (the fast twin of
                LoRALinear.textbook; model.fused.textbook_path() switches to the textbook)
    inject.py   inject_lora (module swap + freeze), merge_lora_, trainable_table
    adapter.py  save_adapter / load_adapter in PEFT's on-disk format; attach_init_adapter
    quant.py    NF4 storage via bitsandbytes (imported only when asked for)
    pissa.py    PiSSA's start from W0's principal components, and its rank-2r form for saving
    chain.py    a frozen init adapter under the trained LoRA (DPO from an SFT adapter), and the
                stacked rank-(r + r0) form it is saved in
"""

from .adapter import (adapter_state_dict, attach_init_adapter, check_adapter_tensors, load_adapter,
                      read_adapter_config, read_adapter_tensors, save_adapter)
from .config import LLAMA_LINEARS, LoRAConfig, LoRAError
from .inject import adapter_disabled, inject_lora, lora_modules, merge_lora_, trainable_table
from .layer import LoRADropout, LoRALinear, init_lora_weights, merge_weight
from .pissa import pissa_init_

__all__ = [
    "LLAMA_LINEARS", "LoRAConfig", "LoRAError", "LoRADropout", "LoRALinear", "adapter_disabled", "adapter_state_dict",
    "attach_init_adapter", "check_adapter_tensors", "init_lora_weights", "inject_lora", "load_adapter",
    "lora_modules", "merge_lora_", "merge_weight", "pissa_init_", "read_adapter_config", "read_adapter_tensors",
    "save_adapter", "trainable_table",
]
