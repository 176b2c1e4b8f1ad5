"""Built-in model sources (``builtin://NAME``), each a module exposing a ``SOURCE`` ModelSource.

The shipped checkpoints and the corpus they were pre-trained on live next to the modules as package
data; ``_build`` and ``_corpus`` hold the code that (re)makes them and are imported only by the
build script and tests. Nothing here imports torch at import time.
"""
