"""lrp's own tests: only jax, numpy and pytest (run after `pip install jax-lrp[test]` with
`python -m pytest --pyargs lrp.tests`)."""
