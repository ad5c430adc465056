"""The SGLang rollout engine: one HTTP client per server, checked against SGLang's own code.

Modules: `engine` (SGLangEngine, the RolloutEngine seam), `prompts` (/generate bodies and
answers), `payload` (weight tensors as SGLang unpickles them), `update_group` (the trainer's
end of a distributed weight-update group), `http` (requests, replaceable transport), `process`
(a launched server's lifecycle), `flags` (launch flags, checked by SGLang's parser).
Tested against SGLang 0.5.23's server app in tests/sglang_api.
"""
from eureka_megatron.rollout.sglang.engine import ALL_MEMORY_TAGS, SGLangEngine
from eureka_megatron.rollout.sglang.flags import server_flags, validate_server_flags
from eureka_megatron.rollout.sglang.http import SGLangHTTPError, SGLangRefused
from eureka_megatron.rollout.sglang.prompts import PromptMismatchError

__all__ = ["ALL_MEMORY_TAGS", "PromptMismatchError", "SGLangEngine", "SGLangHTTPError",
           "SGLangRefused", "server_flags", "validate_server_flags"]
