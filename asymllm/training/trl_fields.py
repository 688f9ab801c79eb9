"""SFTConfig fields that asymllm does itself, so TRL's own handling would act on data asymllm has
already tokenized, or not at all: refused with asymllm's way to the same thing, or taken over
(`--chat_template_path FILE` is `--chat_template FILE`; `--model_init_kwargs` reach the model load
in training/train.py). The full list, with what happens to each: docs/training.md."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import fields

from trl import SFTConfig

from ..chat_templates import ChatTemplateError, check_chat_template_flag


class FieldError(ValueError):
    """An SFTConfig field asymllm does itself, set; the message names the flag and asymllm's way."""


# SFTConfig fields asymllm does itself, so TRL's would act on data asymllm has already tokenized
# (or not at all): refused when set, with asymllm's way to the same thing.
TAKEN_OVER = {
    "dataset_text_field": "asymllm reads instruction data itself (alpaca, chat `messages`, prompt/completion and "
                          "sharegpt layouts) and renders it through the chat template; there is no text column to name",
    "fsdp": "asymllm shards with DeepSpeed (--deepspeed ds_configs/zero3.json; zero2.json, zero3_offload.json) or runs "
            "plain DDP under torchrun; FSDP is not supported",
    "fsdp_config": "asymllm shards with DeepSpeed (--deepspeed ds_configs/zero3.json) or runs plain DDP; FSDP is not supported",
}
# where the model loads: asymllm sets these from its own flags
MODEL_INIT_OWN = {"dtype": "--bf16 / --fp16 (fp32 otherwise)", "torch_dtype": "--bf16 / --fp16 (fp32 otherwise)",
                  "attn_implementation": "--attn_implementation", "quantization_config": "--load_in_4bit / --load_in_8bit and the --bnb_4bit_* flags"}


def check_trl_fields(sft_config) -> None:
    defaults = {f.name: f.default for f in fields(SFTConfig)}
    for name, why in TAKEN_OVER.items():
        value = getattr(sft_config, name, None)
        if value not in (defaults.get(name), None, "", []):
            shown = "" if name.startswith("fsdp") else f" {value}"  # transformers has rewritten --fsdp's value by now
            raise FieldError(f"--{name}{shown}: {why}")
    # loss on the replies only is what asymllm does; TRL's own masking would look for text asymllm has tokenized
    if sft_config.completion_only_loss is False:
        raise FieldError("--completion_only_loss false: asymllm puts the loss on the replies by default; "
                          "--train_on_inputs puts it on every token")
    sft_config.assistant_only_loss, sft_config.completion_only_loss = False, None
    if getattr(sft_config, "use_liger_kernel", False):
        if importlib.util.find_spec("liger_kernel") is None:
            raise FieldError("--use_liger_kernel: needs the liger-kernel package (pip install liger-kernel), whose "
                              "Triton kernels run on NVIDIA GPUs only")
    kwargs = sft_config.model_init_kwargs
    if isinstance(kwargs, str):  # from the command line, a JSON object
        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            raise FieldError(f"--model_init_kwargs {kwargs}: must be a JSON object, e.g. '{{\"revision\": \"main\"}}'") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise FieldError(f"--model_init_kwargs {kwargs}: must be a mapping of from_pretrained keyword arguments")
    for key in kwargs or {}:
        if key in MODEL_INIT_OWN:
            raise FieldError(f"--model_init_kwargs {key}: asymllm sets it from {MODEL_INIT_OWN[key]}; use that instead")
    sft_config.model_init_kwargs = kwargs


def check_chat_template(data_args, sft_config) -> None:
    """--chat_template names a template or a file. TRL's --chat_template_path, given a Jinja file, is
    the same flag; TRL would install it only after asymllm had tokenized the data with another
    template, so asymllm takes it here and TRL never sees it. A tokenizer folder there would have
    TRL add its tokens and resize the embeddings, which a frozen base cannot learn: refused."""
    path = getattr(sft_config, "chat_template_path", None)
    if path is not None:
        if data_args.chat_template is not None:
            raise FieldError(f"--chat_template {data_args.chat_template} and --chat_template_path {path}: give one "
                              "(--chat_template takes a name or a Jinja file)")
        if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            raise FieldError(f"--chat_template_path {path}: asymllm takes a Jinja file (.jinja, .j2) here; copying another "
                              "tokenizer's template adds its tokens to a frozen embedding that cannot learn them. Use "
                              "--chat_template with a name (chatml, llama3, llama2, mistral, alpaca) or a Jinja file")
        data_args.chat_template, sft_config.chat_template_path = path, None
    try:
        check_chat_template_flag(data_args.chat_template)
    except ChatTemplateError as error:
        raise FieldError(str(error)) from None
