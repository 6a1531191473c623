"""Sphinx configuration of the factstore_jax documentation.

Build (from the repository root, after ``pip install ".[docs]"``)::

  sphinx-build -W -b html docs docs/_build/html
"""

import os
import sys

# Document the checkout this file belongs to, installed or not.
sys.path.insert(0, os.path.abspath('..'))

project = 'factstore_jax'
author = 'factstore_jax authors'
copyright = '2025, factstore_jax authors'  # pylint: disable=redefined-builtin

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'myst_parser',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']

# Google-style docstrings (Args / Returns / Raises).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections as :ivar: fields (autodoc documents the fields too).
napoleon_use_ivar = True
autodoc_default_options = {
    'members': True,
    'undoc-members': False,
    'show-inheritance': True,
    'member-order': 'bysource',
}
autodoc_typehints = 'signature'
# Pytree NamedTuples: their fields are documented in the class docstring.
autodoc_inherit_docstrings = False

# Markdown pages (design, results, benchmarks, CLI) are MyST; headings get
# anchors so pages can link to sections.
myst_heading_anchors = 3
myst_enable_extensions = ['dollarmath']

html_theme = 'alabaster'
html_title = 'factstore_jax'
