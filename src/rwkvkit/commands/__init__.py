"""Command-line verbs, one module per group (see :mod:`rwkvkit.cli`)."""
