"""Config checking: every value of a composed config is validated before any weights load.

The schema of a `_target_` group (pruner, factorization, calib, eval.<name>, logger, ...) is the
`__init__` signature of its class; model, budget and the top-level keys have pydantic models.
"""
