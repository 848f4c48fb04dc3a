"""The ``cima`` command: thin adapters over the library, one module per command group."""
