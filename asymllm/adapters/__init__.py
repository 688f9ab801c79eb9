"""Adapters: LoRASYM recipes, their factor inits, where adapters go, the peft wrapping, and an
adapter on disk (save, verify, reload, merge). Upstream of everything: imports no other part."""
