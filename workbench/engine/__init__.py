"""The inference engine: forward pass, KV cache, sampler, generation loop."""
