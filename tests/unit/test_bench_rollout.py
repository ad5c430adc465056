"""`bench rollout` counts the tokens the engine generated and divides by the measured time."""
import pytest

from eureka_megatron.bench import rollout
from eureka_megatron.models.llm_config import LLMConfig

TINY = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def test_generated_tokens_are_the_engines_and_throughput_is_tokens_over_time(monkeypatch):
    seen = []
    real = rollout.generate_timed

    def spy(engine, prompts, n, max_new_tokens, seed=0):
        seconds, samples = real(engine, prompts, n, max_new_tokens, seed)
        seen.append((len(prompts), n, max_new_tokens, seconds, samples))
        return seconds, samples

    monkeypatch.setattr(rollout, "generate_timed", spy)
    rows, columns = rollout.run(quick=True, sizes=(3, 4, 10, 6), model=TINY)
    assert columns[:5] == ["what", "size", "time (s)", "throughput", "% of bound"]
    (row,) = rows
    assert len(seen) == 2 and seen[0][2] == 2  # the warm-up, then the timed call
    _, _, _, seconds, samples = seen[1]
    engine_tokens = sum(len(s.token_ids) for s in samples)
    assert len(samples) == 3 * 4 and row["samples"] == 12
    assert row["generated tokens"] == engine_tokens == 3 * 4 * 6  # EOS off: every row runs to the end
    assert row["time (s)"] == seconds
    assert row["throughput/value"] == pytest.approx(engine_tokens / seconds)
    assert row["throughput/unit"] == "tokens/s"
    assert 0 < row["% of bound"]
