"""Schedule-B trajectory of the test's setup (seed 4), printed per chunk."""
import dataclasses, sys
import jax
import numpy as np
sys.path.insert(0, 'tests')
jax.config.update('jax_default_matmul_precision', 'highest')
import test_transformer as T  # noqa: E402

vocab, perm1, _ = T._task()
ed = T._ed_mlp()
targets = T.data.fact_targets(vocab, perm1)
print('device', jax.devices()[0].platform)
for lr in map(float, sys.argv[1:]):
  config = dataclasses.replace(T.COPY, chunk_steps=50, target_accuracy=0.95,
                               learning_rate=lr)
  model = T._model(vocab, seed=4)
  r = T.train_lib.schedule_b(model, jax.random.key(17), vocab, ed, targets,
                             config)
  print('lr', lr, 'eval', np.round(np.asarray(r.eval_accuracy), 3).tolist())
  print('  loss', np.round(np.asarray(r.loss), 3).tolist())
