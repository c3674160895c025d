"""Bad model paths, configs and prompts give errors that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.generate import generate
from strata.engine.request import ContextLengthError
from strata.engine.runner import ModelRunner
from strata.model.loader import ModelLoadError
from strata.model.spec import UnsupportedModelError


def load(path) -> ModelRunner:
    return ModelRunner.from_config(
        ModelConfig(str(path), dtype="float32"), KVPoolConfig(page_size=4, num_pages=64)
    )


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path)


def test_malformed_config(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(folder)


def test_missing_tensor(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has two
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="layers.2"):
        load(folder)


def test_unsupported_architecture(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load(folder)


def test_unsupported_rope_scaling(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["rope_type"] = "longrope"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="longrope"):
        load(folder)


@pytest.mark.parametrize("where", ["rope_parameters", "top level"])
def test_partial_rotary_embeddings_are_refused_by_name(tiny_checkpoint, where):
    """Phi-4-mini rotates 3/4 of each head: refused, never run as if it rotated all."""
    folder, _ = tiny_checkpoint("phi3", pad_token_id=0)
    cfg = json.loads((folder / "config.json").read_text())
    if where == "rope_parameters":
        cfg["rope_parameters"]["partial_rotary_factor"] = 0.75
    else:
        cfg["rope_parameters"].pop("partial_rotary_factor", None)
        cfg["partial_rotary_factor"] = 0.75
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.75"):
        load(folder)


def test_prompt_longer_than_context_is_rejected_and_frees_nothing(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", max_position_embeddings=32)
    runner = load(folder)
    free = runner.pool.num_free
    with pytest.raises(ContextLengthError, match="exceeds the context length of 32"):
        list(generate(runner, list(range(40)), 4))
    assert runner.pool.num_free == free


def test_cli_reports_a_bad_model_path_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "generate", "hi", "--model-path", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
