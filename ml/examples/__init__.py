"""Built-in examples that ship with the package: ``ml train digits``."""
