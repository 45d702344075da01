"""LoRA moved to `scratchllm.model.lora` (checkpoint loading rebuilds adapter runs, so it sits
below `checkpoint`); these names keep older imports working."""

from scratchllm.model.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    LoRALinear,
    apply_lora,
    check_trainable,
    check_untied,
    count_parameters,
    format_parameter_counts,
    freeze_all_but,
    has_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_scaling,
    lora_state_dict,
    merge_lora,
    name_matches,
    replace_module,
    select_names,
    shared_weight_owner,
)

__all__ = [
    "DEFAULT_TARGETS", "LoraConfig", "LoRALinear", "apply_lora", "check_trainable",
    "check_untied", "count_parameters", "format_parameter_counts", "freeze_all_but", "has_lora",
    "load_lora_state_dict", "lora_parameters", "lora_scaling", "lora_state_dict", "merge_lora",
    "name_matches", "replace_module", "select_names", "shared_weight_owner",
]
