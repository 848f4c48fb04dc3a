"""cima's benchmarks: each module has ``run(**options) -> list[dict]``; ``run.py`` runs them all."""
