"""A 1-layer, 1-head Transformer with a pluggable fact MLP.

See docs/design.md, "Transformers and usability".

* :mod:`.data` — vocabulary (keys, values, junk and query tokens as rows of
  one frozen embedding table) and the on-device ``junk^L K junk^L Q -> V``
  sequence generator.
* :mod:`.model` — the Flax NNX model and its switches.
* :mod:`.train` — Optax AdamW training of chosen parameter groups in jitted
  chunks, recall evaluation and the attention noise floor.
"""
