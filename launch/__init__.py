"""The wiring above the three packages: the `strata` command line (launch.cli), the
processes it starts (launch.serve: `strata serve`, the gateway and the split workers) and the
supervisor of a local cluster (launch.up). Imports go one way: launch -> gateway ->
services -> strata (the core), checked by import-linter (the contracts in pyproject.toml)."""
