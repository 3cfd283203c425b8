"""Parts of the simulated cohort: configuration, population model and oracle, rendering.

The entry module is `jax_brainage.data.simulate` (Cohort, write_cohort, the CLI).
"""
