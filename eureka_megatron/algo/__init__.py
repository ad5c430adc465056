"""The RL algorithm: online filter -> advantages -> policy loss (with KL, entropy, shaping)."""
from eureka_megatron.algo.advantages import compute_advantages
from eureka_megatron.algo.filtering import online_filter
from eureka_megatron.algo.policy_loss import policy_loss_sums
from eureka_megatron.algo.reward_shaping import kl_penalized_rewards, overlong_penalty

__all__ = ["compute_advantages", "online_filter", "policy_loss_sums", "kl_penalized_rewards",
           "overlong_penalty"]
