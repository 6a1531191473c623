"""factstore_jax: fact-storing MLPs in JAX (arXiv 2512.00207).

Main entry points::

  from factstore_jax import (FactSet, random_factset, construct,
                             construct_batched, evaluate_mlp)
  from factstore_jax.decodability import decodability
"""

from factstore_jax.constructions.encoder_decoder import (
    Construction, ConstructionConfig, ConstructionReport, FixedConstruction,
    construct, construct_batched, construct_fixed)
from factstore_jax.decodability import Decodability, undecodable_values
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)
from factstore_jax.factsets import (FactSet, load_factset, make_factset,
                                    random_factset, save_factset,
                                    stack_factsets)
from factstore_jax.mlp import EncoderDecoder, GatedMLP, GatedMLPModule, num_params
from factstore_jax.serialization import load_model, save_model
from factstore_jax.storage import (StorageReport, evaluate_fn, evaluate_mlp,
                                   evaluate_outputs)

__version__ = '0.1.0'
