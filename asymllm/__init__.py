"""asymllm: instruction tuning with asymmetric low-rank adapters (LoRASYM).

The public API is imported lazily (PEP 562): `asymllm recipes` and `asymllm --help` import
this package, and must not pay for torch + peft (seconds) to print a table.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

# bitsandbytes (the qlora extra), imported by peft, asks the hub for an optional CPU kernel on CPUs
# with AVX512-bf16 and warns on every import when it cannot have it; its own CPU kernels run
# instead, so the warning only alarms (a result of asymllm never depends on that kernel).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# public name -> the module that defines it
_PUBLIC = {
    "ALIASES": "adapters.recipe", "Recipe": "adapters.recipe", "RecipeError": "adapters.recipe",
    "LoRASYMConfig": "adapters.model", "apply_recipe": "adapters.model", "get_lorasym_model": "adapters.model",
    "lora_layers": "adapters.model",
    "AdapterFileError": "adapters.files", "load_lorasym_model": "adapters.files", "save_adapter": "adapters.files",
    "verify_adapter_dir": "adapters.files",
    "merge_lorasym": "adapters.merge",
    "count_parameters": "zero",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'asymllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
