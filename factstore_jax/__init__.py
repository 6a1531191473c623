"""factstore_jax: fact-storing MLPs in JAX (arXiv 2512.00207).

Main entry points::

  from factstore_jax import (random_factset, decodability, construct,
                             evaluate_mlp, train_mlp, find_capacity, edit)

Every name below is also importable from its own module (for example
``factstore_jax.decodability.decodability``); the modules hold the rest.
Note that ``factstore_jax.decodability`` is the *function* here: import the
module's other names with ``from factstore_jax.decodability import ...``.
"""

from factstore_jax.baselines.hebbian import hebbian_mlp
from factstore_jax.baselines.ntk import ntk_mlp
from factstore_jax.capacity.methods import (Built, Capacity, MethodOptions,
                                            build_mlp, find_capacity,
                                            smallest_mlp)
from factstore_jax.constructions.bucket_edits import (Delete, EditReport,
                                                      Insert, Update, edit)
from factstore_jax.constructions.encoder_decoder import (
    Construction, ConstructionConfig, ConstructionReport, FixedConstruction,
    construct, construct_batched, construct_fixed)
from factstore_jax.decodability import (Decodability, decodability,
                                        undecodable_values, used_values)
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)
from factstore_jax.factsets import (FactSet, load_factset, make_factset,
                                    random_factset, save_factset,
                                    stack_factsets)
from factstore_jax.mlp import EncoderDecoder, GatedMLP, GatedMLPModule, num_params
from factstore_jax.serialization import load_model, save_model
from factstore_jax.storage import (StorageReport, evaluate_fn, evaluate_mlp,
                                   evaluate_outputs)
from factstore_jax.threads import expose_cpu_cores
from factstore_jax.training import (TrainConfig, TrainResult, finetune,
                                    train_encoder_decoder, train_mlp)

__version__ = '0.1.0'

__all__ = [
    'Built', 'Capacity', 'Construction',
    'ConstructionConfig', 'ConstructionError', 'ConstructionReport',
    'Decodability', 'Delete', 'EditReport', 'EncoderDecoder', 'FactSet',
    'FactStoreError', 'FixedConstruction', 'GatedMLP', 'GatedMLPModule',
    'InfeasibleFactSetError',
    'Insert', 'MethodOptions', 'StorageReport', 'TrainConfig', 'TrainResult',
    'Update', 'build_mlp', 'construct', 'construct_batched', 'construct_fixed',
    'decodability', 'edit', 'evaluate_fn', 'evaluate_mlp', 'evaluate_outputs',
    'expose_cpu_cores', 'find_capacity', 'finetune', 'hebbian_mlp',
    'load_factset', 'load_model', 'make_factset', 'ntk_mlp', 'num_params',
    'random_factset', 'save_factset', 'save_model', 'smallest_mlp',
    'stack_factsets', 'train_encoder_decoder', 'train_mlp',
    'undecodable_values', 'used_values',
]
