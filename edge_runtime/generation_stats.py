"""The counts and timings a generation leaves behind, shared by the model and the conversations on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """Counts and timings of the last generation, as llama.cpp prints them."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, found in the cache and not run again
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "stop"  # "stop" (end of turn, EOS, a stop string) or "length" (max tokens, context end)
    mask_seconds: float = 0.0  # of decode's time, spent on a constraint's masks (constrained decoding)
    constrained_tokens: int = 0  # draws a constraint masked

    @property
    def processed_tokens(self) -> int:
        """Prompt tokens that went through the model this time."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.processed_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time spent producing them (the first comes from prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "generated_tokens": self.generated_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second, "finish_reason": self.finish_reason,
                "mask_seconds": self.mask_seconds, "constrained_tokens": self.constrained_tokens}
