"""The REST routes, one router each: OpenAI's API, SGLang's native API, and administration."""
