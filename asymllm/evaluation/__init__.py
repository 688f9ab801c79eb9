"""Evaluation: MMLU as lm-evaluation-harness scores it, alpaca-style generation with a
built-in judge, and a comparison report. Entry: `asymllm eval <mmlu|alpaca|report>`.
Imports adapters and the shared helpers, never training or export."""
