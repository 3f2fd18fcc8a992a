"""Stage entry points: one module per dvc.yaml stage, each a thin `run(params, *args)` over the library.

Only these modules read and write files; the library functions they call take and return tensors.
"""
