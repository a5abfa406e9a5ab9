"""How a run executes: where block weights live (`offload`), in which order blocks stream (`stream`),
where factorizations wait for a global allocation (`factors`), and the planner that sizes a run
before its weights load and resolves the `auto` choices.

- `choices`: the `execution` config node, the `auto` rules, and the stream order (`model_major`).
- `offload`: the block stores, one class per offload mode, each stating its footprint.
- `factors`: where scored blocks wait for the allocation, one class per factors mode.
- `requirements`: what a pruner asks of a run (calibration, factorizations, moments, ...).
- `sizes`: what a run holds, in bytes; `plan`: the planner (`python -m stat_exp.execution <overrides>`).
"""
