"""Each execution mode is one class that states what it holds: the planner adds up these footprints,
and the config accepts every registered mode (adding a mode is a class and a row here)."""
from __future__ import annotations

import pytest

from stat_exp.config.signature import check_node
from stat_exp.errors import ConfigError
from stat_exp.execution.choices import ExecutionSpec
from stat_exp.execution.factors import FACTORS, SpilledPending, factors_class
from stat_exp.execution.offload import STORES, OffloadError, store_class
from stat_exp.execution.sizes import BlockSizes, Footprint, Sizes

# two blocks of 100 and 200 bytes of weights (heavy state 7 and 9), 50 bytes outside the blocks
SIZES = Sizes(blocks=[BlockSizes(100, 10, 5, 7, 3), BlockSizes(200, 10, 5, 9, 3)], rest_weights=50, hidden=0,
              eval_work=0, tokens=0, calibration_flops=0, gram_flops=0, factor_flops=0, pivot_steps=0)


@pytest.mark.parametrize("mode, on_cpu, resident, expected", [
    ("none", False, True, Footprint(device=350)),
    ("none", True, True, Footprint(device=350, host=350)),
    ("cpu", False, False, Footprint(device=250, host=350)),
    ("disk", False, False, Footprint(device=250, host=400, disk=300)),  # the biggest block read and written back
    ("disk", True, False, Footprint(device=250, host=450, disk=300)),
])
def test_each_store_states_its_footprint(mode, on_cpu, resident, expected):
    store = store_class(mode)
    assert store.mode == mode and store.resident is resident
    assert store.footprint(SIZES, on_cpu) == expected


@pytest.mark.parametrize("mode, expected, second_pass", [
    ("hold", Footprint(device=16), False),
    ("spill", Footprint(disk=16), False),
    ("recompute", Footprint(), True),
])
def test_each_factors_mode_states_its_footprint_and_passes(mode, expected, second_pass, tmp_path):
    factors = factors_class(mode)(tmp_path)
    assert factors.footprint(SIZES) == expected and factors.second_pass is second_pass
    assert isinstance(factors.pending(), SpilledPending) is (mode == "spill")


def test_every_registered_mode_is_a_config_choice_and_others_are_not():
    for mode in STORES:
        check_node("execution", {"offload": mode}, ExecutionSpec)
    for mode in FACTORS:
        check_node("execution", {"factors": mode}, ExecutionSpec)
    with pytest.raises(ConfigError, match="execution.offload='tape'"):
        check_node("execution", {"offload": "tape"}, ExecutionSpec)
    with pytest.raises(OffloadError, match="allowed: none, cpu, disk"):
        store_class("tape")
    with pytest.raises(ConfigError, match="spill needs a folder"):
        factors_class("spill")()
