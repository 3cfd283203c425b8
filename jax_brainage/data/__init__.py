"""Data stage: the simulated cohort, the NIfTI layer, the prepared cache and the grain pipeline."""
