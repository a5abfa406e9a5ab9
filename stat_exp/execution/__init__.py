"""How a run executes: where block weights live (`offload`), in which order blocks stream (`stream`),
where factorizations wait for a global allocation (`factors`), and the planner that sizes a run
before its weights load and resolves the `auto` choices.

- `choices`: the execution choices of a run and the `auto` rules.
- `offload`: the block stores, one per offload mode.
- `factors`: where scored blocks wait for the allocation, one class per factors mode.
- `plan`: the planner (`python -m stat_exp.execution.plan <overrides>`).
"""
