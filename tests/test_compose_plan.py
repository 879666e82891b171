"""metalora_core.compose: which adapters run in which pass, and how passes combine (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from metalora_core.compose import Composition, combine, merged_weight, plan, step_index, switch_active
from metalora_core.errors import MetaLoRAError

SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def test_step_index_finds_each_schedule_sigma_and_counts_intermediate_evaluations_to_their_step():
    assert [step_index(SIGMAS, float(s)) for s in SIGMAS[:-1]] == [0, 1, 2, 3]
    assert step_index(SIGMAS, 0.6) == 1  # a second-order sampler's evaluation between 0.75 and 0.5
    assert step_index(SIGMAS, 0.0) == 3 and step_index(SIGMAS, 2.0) == 0


def test_switch_rotates_every_k_steps_in_list_order():
    assert [switch_active(s, 2, 3) for s in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    c = Composition("switch", (0.9, 0.5), (1.0, 1.0), every=1)
    assert [plan(c, s) for s in range(3)] == [[([0.9, 0.0], 1.0)], [([0.0, 0.5], 1.0)], [([0.9, 0.0], 1.0)]]


def test_merge_is_one_pass_with_every_adapter_and_composite_one_pass_each_with_normalized_shares():
    assert plan(Composition("merge", (0.9, -0.5), (1.0, 1.0)), 5) == [([0.9, -0.5], 1.0)]
    c = Composition("composite", (0.9, 0.5, 1.0), (3.0, 1.0, 0.0))
    assert plan(c, 0) == [([0.9, 0.0, 0.0], 0.75), ([0.0, 0.5, 0.0], 0.25)]  # weight 0: no pass at all


def test_combine_is_the_weighted_sum_in_float64():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(combine([a, b], [0.75, 0.25]), 0.75 * a + 0.25 * b, atol=1e-15)
    assert combine([a], [1.0]) is a
    w, d1, d2 = (torch.randn(4, 5, generator=g) for _ in range(3))
    ref = w.double() + 0.5 * d1.double() - 2.0 * d2.double()
    assert torch.equal(merged_weight(w, [d1, d2], [0.5, -2.0]), ref)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("blend", (1.0,), (1.0,)), "unknown composition strategy"),
        (("merge", (), ()), "at least one adapter"),
        (("switch", (1.0,), (1.0,), 0), "every 0 steps"),
        (("composite", (1.0, 1.0), (0.0, 0.0)), "sum to 0"),
        (("composite", (1.0, 1.0), (1.0, -1.0), 1, ("id", "style")), "weight of style"),
    ],
)
def test_bad_compositions_say_what_is_wrong(args, match):
    with pytest.raises(MetaLoRAError, match=match):
        Composition(*args)
