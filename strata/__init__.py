"""strata: an LLM inference engine built around a radix-indexed paged KV cache."""

__version__ = "0.1.0"
