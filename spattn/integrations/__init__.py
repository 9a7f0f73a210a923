"""Engine integrations (one module per engine, imported only on use). They use only spattn's
public API, so they double as examples for engines not covered here:

- ``spattn.integrations.diffusers``: ``parallelize(transformer, mesh)`` for diffusers DiTs.
- ``spattn.integrations.transformers``: ``register(mesh)`` / ``shard_inputs`` for Hugging Face LLMs.
"""
