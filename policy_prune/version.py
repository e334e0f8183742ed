"""The package's version, in a module that imports nothing: ``policy_prune.__version__`` and the scorer
artifact (which the package's ``__init__`` imports) both read it here, so neither imports the other."""

__version__ = "0.1.0"
