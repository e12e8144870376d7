"""Flickr8k image-text retrieval benchmark for the adaptive-contrastive losses.

The modules import each other as ``examples.flickr8k``, so the repository root must be on
``sys.path``. ``run.py`` adds it when started as a script, and ``tests/examples/conftest.py``
adds it for the tests.
"""
