"""asymllm: instruction tuning with asymmetric low-rank adapters (LoRASYM)."""

__version__ = "0.1.0"

from .recipe import ALIASES, Recipe, RecipeError  # noqa: E402
from .adapter import LoRASYMConfig, apply_recipe, get_lorasym_model, lora_layers  # noqa: E402
from .checkpoint import AdapterFileError, load_lorasym_model, save_adapter, verify_adapter_dir  # noqa: E402
from .merge import merge_lorasym  # noqa: E402
from .zero import count_parameters  # noqa: E402

__all__ = [
    "ALIASES", "Recipe", "RecipeError", "LoRASYMConfig", "get_lorasym_model", "apply_recipe", "lora_layers",
    "save_adapter", "load_lorasym_model", "verify_adapter_dir", "AdapterFileError", "merge_lorasym",
    "count_parameters",
]
