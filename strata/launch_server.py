"""`python -m strata.launch_server`, SGLang's path: runs launch.sglang (its flags, served by
`strata serve`)."""

import runpy

# NOTE: run by name, not imported: this file only keeps SGLang's module path, and the core
# (strata/) imports nothing from the wiring above it (the import-linter contract in
# pyproject.toml).
if __name__ == "__main__":
    runpy.run_module("launch.sglang", run_name="__main__", alter_sys=True)
