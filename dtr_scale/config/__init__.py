"""Typed run configuration: YAML -> dataclasses, dotted overrides, validation, and the DeepSpeed JSON.

One source of truth: every knob of a run lives in `RunConfig`; the DeepSpeed JSON is derived from it
(`deepspeed_config`), and a user-supplied DeepSpeed JSON is checked against it. Unknown keys, wrong
types and impossible combinations are errors that name the key, raised before any work starts.

  schema.py          the dataclasses (one per YAML section), `ConfigError`, `dump_yaml`
  loading.py         YAML (1.2 numbers: 1e-4) + overrides -> a validated `RunConfig` (`load_config`,
                     `config_from_dict`)
  validation.py      checks that need no world size, data or device (`validate`, `stratifies`)
  objective.py       what applies to diffusion.objective ddpm / flow (checks, learn_sigma's default)
  deepspeed_json.py  batch layout, precision and the DeepSpeed JSON for a world size and device
  changes.py         which keys may change when a run resumes (the rest is refused), and config diffs
"""

from dtr_scale.config.deepspeed_json import (
    deepspeed_config,
    gradient_accumulation,
    merge_user_deepspeed_config,
    resolve_batch_layout,
    resolve_precision,
)
from dtr_scale.config.loading import apply_override, config_from_dict, load_config
from dtr_scale.config.schema import (
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    MTLConfig,
    RoutingConfig,
    RunConfig,
    TrainConfig,
    dump_yaml,
)
from dtr_scale.config.validation import stratifies, validate

__all__ = [
    "ConfigError", "DataConfig", "DeepSpeedConfig", "DiffusionConfig", "EvalConfig", "MTLConfig", "ModelConfig",
    "MonitorConfig", "RoutingConfig", "RunConfig", "TrainConfig", "apply_override", "config_from_dict",
    "deepspeed_config", "dump_yaml", "gradient_accumulation", "load_config", "merge_user_deepspeed_config",
    "resolve_batch_layout", "resolve_precision", "stratifies", "validate",
]  # fmt: skip
