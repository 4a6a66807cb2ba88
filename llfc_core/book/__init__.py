"""The book's orchestration, built on the core: profiles and settings, the pairs a setting needs, the
tables each chapter reads, the paper's claims, sweeps, the chapter harness, results and figure styles.

The core (`llfc_core.data`, `models`, `train`, `permutation`, `matching`, `interpolate`, `metrics`,
`neurons`, ...) never imports this package: a researcher uses the core on their own models without it.
"""
