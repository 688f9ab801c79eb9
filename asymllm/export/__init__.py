"""Export: an adapter (or a ZeRO-3 checkpoint) merged into its base as a plain transformers
folder, streamed through safetensors, verified against base + adapter, with a model card.
Imports adapters and the shared helpers, never training. Entry: `asymllm export`."""
