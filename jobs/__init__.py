"""Entry points and the ``tal`` command-line interface."""
