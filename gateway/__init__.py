"""The HTTP front of strata: OpenAI-compatible and SGLang-style REST over a Backend."""
