"""Fact editing inside a Transformer (docs/design.md, "Fact editing").

``locate``: ROME, MEMIT and AlphaEdit updates of an MLP's down-projection.
``relation``: the synthetic relation task and its base model.
``harness``: one evaluation for every editing method (MLP swap included).

Bucket-local edits of a constructed MLP live in
:mod:`factstore_jax.constructions.bucket_edits`.
"""
