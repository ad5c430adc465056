"""eureka-megatron."""
