"""Typed configuration: dataclasses loaded from YAML plus dotted `key=value` overrides, validated
at load, before any rank starts, so a bad layout or a typo fails in one line naming the key.

  loader.py    YAML + overrides -> dataclasses (types, `Literal` choices, unknown keys)
  sections.py  the sections every run shares: parallel, optim, checkpoint, algo, rewards
  lm.py        the `train-lm` run;  rl.py  the RL run (`train`)
Architecture configs live next to their models (`models/llm_config.py`, `models/<family>/config.py`).
"""
from eureka_megatron.config.lm import Config, TrainConfig, load_config
from eureka_megatron.config.loader import from_dict, load, read_config_data, to_dict
from eureka_megatron.config.rl import RLConfig, load_rl_config
from eureka_megatron.config.sections import (DEFAULT_REWARD, AlgoConfig, CheckpointConfig,
                                             OptimConfig, ParallelConfig, RewardConfig)
from eureka_megatron.errors import ConfigError

__all__ = ["AlgoConfig", "CheckpointConfig", "Config", "ConfigError", "DEFAULT_REWARD",
           "OptimConfig", "ParallelConfig", "RLConfig", "RewardConfig", "TrainConfig",
           "from_dict", "load", "load_config", "load_rl_config", "read_config_data", "to_dict"]
