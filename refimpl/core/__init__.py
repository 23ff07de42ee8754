"""The method: ops with their backward passes, the decoder and its kv-cache, the coprocessor,
the multi-trace layout and masks, and the objective in its three forms."""
