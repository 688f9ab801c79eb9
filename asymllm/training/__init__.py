"""Training: flags and config, tokenisation with response-only labels, the packing check, TRL's
SFTTrainer with the fixes asymmetric adapters need, and the `asymllm train` entry point.
Imports adapters and the shared helpers; nothing imports training but its entry points."""
