"""eureka-megatron: rule-based RL for vision-language reasoning on Megatron-core."""

__version__ = "0.1.0"
