"""A base model loaded in 4 or 8 bits through bitsandbytes (QLoRA), with TRL's ModelConfig flag
names: --load_in_4bit, --load_in_8bit, --bnb_4bit_quant_type nf4|fp4, --use_bnb_nested_quant,
--bnb_4bit_compute_dtype, --bnb_4bit_quant_storage. The same settings serve training,
evaluation and chat, and a result records them: a 4-bit result is never taken for a
full-precision one.

    quant = Quantization(load_in_4bit=True); quant.check()        # QuantizationError naming the flag
    model = AutoModelForCausalLM.from_pretrained(path, **quant.load_kwargs(default_compute="float32"))
    weight = dequantized_weight(layer.get_base_layer())            # the float weight the adapter trains against

bitsandbytes (the `qlora` extra) runs its 4-bit and 8-bit layers on CPUs too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORAGE = ("uint8", "float32", "bfloat16", "float16")


class QuantizationError(ValueError):
    """Quantization flags that cannot be used; the message names them."""


@dataclass
class Quantization:
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_compute_dtype: str | None = None   # default: the training dtype (bf16 / fp16 / fp32)
    bnb_4bit_quant_storage: str | None = None   # default uint8; under ZeRO-3 the training dtype

    @classmethod
    def from_record(cls, record: dict | None) -> "Quantization":
        """The settings a run record's `base_quantization` (Quantization.record) names."""
        if not record:
            return cls()
        if record.get("bits") == 8:
            return cls(load_in_8bit=True)
        return cls(load_in_4bit=True, bnb_4bit_quant_type=record.get("quant_type", "nf4"),
                   use_bnb_nested_quant=bool(record.get("nested")), bnb_4bit_compute_dtype="float32")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def bits(self) -> int | None:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def check(self) -> None:
        """Refuse what cannot load, before anything loads."""
        if self.load_in_4bit and self.load_in_8bit:
            raise QuantizationError("--load_in_4bit and --load_in_8bit: give one (4 bits: QLoRA's NF4; 8 bits: LLM.int8)")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise QuantizationError(f"--bnb_4bit_quant_type {self.bnb_4bit_quant_type}: must be one of {', '.join(QUANT_TYPES)}")
        if self.bnb_4bit_compute_dtype is not None and self.bnb_4bit_compute_dtype not in DTYPES:
            raise QuantizationError(f"--bnb_4bit_compute_dtype {self.bnb_4bit_compute_dtype}: must be one of "
                                    "float32, bfloat16, float16")
        if self.bnb_4bit_quant_storage is not None and self.bnb_4bit_quant_storage not in STORAGE:
            raise QuantizationError(f"--bnb_4bit_quant_storage {self.bnb_4bit_quant_storage}: must be one of {', '.join(STORAGE)}")
        if not self.enabled:
            changed = [f"--{k}" for k, v in asdict(self).items() if k.startswith(("bnb_", "use_bnb")) and v not in (None, False, "nf4")]
            if changed:
                raise QuantizationError(f"{', '.join(changed)}: only with --load_in_4bit")
            return
        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizationError(f"--load_in_{self.bits}bit needs bitsandbytes: pip install \"asymllm[qlora]\" "
                                    "(it runs its 4-bit and 8-bit layers on CPUs and NVIDIA GPUs)")

    def config(self, default_compute: str = "float32"):
        """transformers' BitsAndBytesConfig for these flags (None when not quantized)."""
        if not self.enabled:
            return None
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = self.bnb_4bit_compute_dtype or default_compute
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
                                  bnb_4bit_compute_dtype=DTYPES[compute],
                                  bnb_4bit_quant_storage=DTYPES.get(self.bnb_4bit_quant_storage or "", torch.uint8))

    def load_kwargs(self, default_compute: str = "float32", device: str | None = None) -> dict:
        """from_pretrained keywords: the config, and the device the weights are quantized on (bitsandbytes
        quantizes while loading, so the model is placed then, not moved after)."""
        if not self.enabled:
            return {}
        if device is None:
            import os

            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        return {"quantization_config": self.config(default_compute), "device_map": {"": device}}

    def record(self, default_compute: str = "float32") -> dict | None:
        """What a run record, a result and a fingerprint keep of it (None: full precision)."""
        if not self.enabled:
            return None
        if self.load_in_8bit:
            return {"bits": 8, "method": "bitsandbytes LLM.int8"}
        return {"bits": 4, "method": "bitsandbytes", "quant_type": self.bnb_4bit_quant_type,
                "nested": self.use_bnb_nested_quant, "compute_dtype": self.bnb_4bit_compute_dtype or default_compute,
                "quant_storage": self.bnb_4bit_quant_storage or "uint8"}

    def describe(self, default_compute: str = "float32") -> str:
        if not self.enabled:
            return "full precision"
        if self.load_in_8bit:
            return "8-bit (bitsandbytes LLM.int8)"
        return (f"4-bit {self.bnb_4bit_quant_type}{' with nested quantization' if self.use_bnb_nested_quant else ''} "
                f"(bitsandbytes), compute in {self.bnb_4bit_compute_dtype or default_compute}")


def is_quantized_layer(module: torch.nn.Module) -> bool:
    return is_quantized_layer_weight(getattr(module, "weight", None))


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as float32: dequantized for a bitsandbytes layer (what its forward
    computes with), as stored otherwise."""
    if not is_quantized_layer(module):
        return module.weight.detach().float()
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module).detach().float()


def quantized_model(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def add_quantization_flags(parser) -> None:
    """The flags `asymllm train` takes, for the commands that load a model to evaluate or chat."""
    group = parser.add_argument_group("quantized base (bitsandbytes; pip install 'asymllm[qlora]')")
    group.add_argument("--load_in_4bit", action="store_true", help="load the base in 4 bits, as a QLoRA run trained it")
    group.add_argument("--load_in_8bit", action="store_true", help="load the base in 8 bits")
    group.add_argument("--bnb_4bit_quant_type", default="nf4", help="nf4 (default) or fp4")
    group.add_argument("--use_bnb_nested_quant", action="store_true", help="double quantization")
    group.add_argument("--bnb_4bit_compute_dtype", help="float32, bfloat16 or float16 (default: the --dtype)")


def quantization_from_args(args) -> Quantization:
    return Quantization(args.load_in_4bit, args.load_in_8bit, args.bnb_4bit_quant_type, args.use_bnb_nested_quant,
                        args.bnb_4bit_compute_dtype)


def check_layers_quantized(model: torch.nn.Module, bits: int) -> str | None:
    """After a quantized load: QuantizationError when no linear layer of the blocks was quantized,
    a warning (returned) naming the ones that stayed in full precision. bitsandbytes replaces
    torch.nn.Linear layers (and GPT-2's Conv1D), and transformers keeps some modules out."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D)) or is_quantized_layer(m)]
    layers = [(name, m) for name, m in layers if m is not head]
    left = sorted({name.rsplit(".", 1)[-1] + f" ({type(m).__name__})" for name, m in layers if not is_quantized_layer(m)})
    if layers and len(left) and not any(is_quantized_layer(m) for _, m in layers):
        raise QuantizationError(f"--load_in_{bits}bit: bitsandbytes quantized no layer of this "
                                f"{getattr(model.config, 'model_type', '')} model ({', '.join(left)}); it quantizes "
                                "torch.nn.Linear (and GPT-2's Conv1D) layers transformers does not keep out; train it "
                                "in full precision")
    if left:
        return (f"--load_in_{bits}bit: these layers stay in full precision (bitsandbytes quantizes torch.nn.Linear and "
                f"Conv1D layers, and transformers keeps some modules out): {', '.join(left)}")
    return None


def release_checkpoint_memory(model: torch.nn.Module) -> float | None:
    """After a quantizing load: give the model its own copies of the weights that stayed in full
    precision (embeddings, head, norms: views into the memory-mapped checkpoint files until now) and
    hand the heap memory the load freed back to the system. Returns how many MiB the resident set
    shrank by (None where /proc or glibc's malloc_trim is not available).

    Without it a 4-bit model stays at the resident size of the full-precision one: every page of
    the checkpoint files the quantizer read stays mapped while a tensor views the mapping
    (measured on a 1.0B Llama: 3952 MiB resident after the load, 1592 after this;
    benchmarks/RESULTS.md, qlora)."""
    import ctypes
    import ctypes.util
    import gc

    before = _rss_mib()
    with torch.no_grad():
        for param in model.parameters():
            if not is_quantized_layer_weight(param):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): the mapping is released all the same
        pass
    after = _rss_mib()
    return None if before is None or after is None else before - after


def is_quantized_layer_weight(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
