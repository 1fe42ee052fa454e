"""The shipped engine packages: classical baselines (identity, bicubic x2, Gaussian) built by
``python -m engines.offline.baselines``, the reference every learned engine must beat."""
