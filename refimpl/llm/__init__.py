"""Pretrained LLMs as frozen decoders: fetch one by name, convert it once to a refimpl checkpoint."""
