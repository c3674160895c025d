"""One module per model family, each defining FAMILY (strata.model.family.Family); the
registry (strata.model.registry) lists them."""
