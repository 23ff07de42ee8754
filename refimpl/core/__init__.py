"""The method (paper §3): ops, decoder and kv-cache, coprocessor, multi-trace layout, objective."""
