"""Baselines the construction is measured against: NTK / associative
memory and Hebbian / bilinear random features (GD lives in
:mod:`factstore_jax.training`)."""
