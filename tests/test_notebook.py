"""Executes ``notebooks/quickstart.ipynb`` top to bottom (nbclient, python3).

The notebook is checked in executed (outputs and plots visible); this test
re-executes a fresh copy and checks what it computed.

The notebook's last cell prints one line ``SUMMARY {json}`` with what it
computed; this test checks it. The kernel runs this interpreter
(``sys.executable``), so the notebook's install cell finds the package and
never reaches the network. About a minute on a 2-core CPU, nearly all of it
XLA compilation.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK = (pathlib.Path(__file__).resolve().parent.parent / 'notebooks' /
            'quickstart.ipynb')
CELL_TIMEOUT_S = 600


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _stream_text(nb) -> str:
  text = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.get('output_type') == 'stream':
        text.append(out['text'])
  return ''.join(text)


def test_committed_executed():
  """Checked in executed, so its outputs and plots show where people read it."""
  nb = _read()
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  code = [c for c in nb.cells if c.cell_type == 'code']
  counts = [c.execution_count for c in code]
  assert None not in counts, 'execute the notebook top to bottom, then commit'
  assert counts == sorted(counts), 'cells were executed out of order'
  for cell in code:
    assert all(o.get('output_type') != 'error' for o in cell.outputs)
  assert any('image/png' in o.get('data', {}) for c in code
             for o in c.outputs), 'the scaling plot is missing'
  assert 'SUMMARY ' in _stream_text(nb)


def test_first_cell_installs_only_when_missing():
  first = next(c for c in _read().cells if c.cell_type == 'code').source
  assert 'REPO = ' in first
  assert 'import factstore_jax' in first
  assert first.index('except ImportError') < first.index('%pip install')


def test_runs_top_to_bottom(tmp_path):
  nb = _read()
  for cell in nb.cells:  # start from a clean copy of the checked-in outputs
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
  km = AsyncKernelManager(kernel_name='python3')
  # This interpreter, not whatever `python` is first on PATH.
  km.kernel_spec.argv[0] = sys.executable
  client = nbclient.NotebookClient(
      nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell

  # Every code cell ran and none produced an error output.
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.execution_count is not None
      assert all(o.get('output_type') != 'error' for o in cell.outputs)
  # The scaling plot was drawn.
  assert any('image/png' in o.get('data', {})
             for c in nb.cells if c.cell_type == 'code' for o in c.outputs)

  lines = [l for l in _stream_text(nb).splitlines()
           if l.startswith('SUMMARY ')]
  assert len(lines) == 1, _stream_text(nb)[-2000:]
  summary = json.loads(lines[0][len('SUMMARY '):])
  print('notebook summary:', summary)

  # Closed form: every fact stored, by its report and by the dense check.
  assert summary['construct_accuracy'] == 1.0
  assert summary['construct_min_margin'] > 0
  assert summary['dense_check_accuracy'] == 1.0
  # GD at its W* stores every fact with far fewer parameters.
  assert summary['gd_accuracy'] == 1.0
  assert 0 < summary['gd_params'] < summary['closed_form_params']
  # Scaling: three sizes, parameters grow with N for both methods.
  assert summary['scaling_sizes'] == sorted(summary['scaling_sizes'])
  assert len(summary['scaling_sizes']) == 3
  for key in ('scaling_gd', 'scaling_closed_form'):
    assert len(summary[key]) == 3
    assert summary[key][0] < summary[key][-1]
  # Transformer with the inserted MLP, and after the edit + MLP swap.
  assert summary['transformer_recall'] >= 0.99
  assert summary['edited_transformer_recall'] >= 0.99
  # Bucket-local edit: every fact stored, untouched outputs bit-identical.
  assert summary['edit_accuracy'] == 1.0
  assert summary['edit_min_margin'] > 0
  assert summary['edit_untouched_identical'] is True
