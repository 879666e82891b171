"""The CPU head bank: paging keeps optimizer state to the batch, and paged AdamW equals a resident one."""

from __future__ import annotations

import torch
from torch import nn

from metalora_core.adapter import IdentityHead
from metalora_core.inject import head_key
from metalora_core.meta.bank import BankLayout, HeadBank, optimizer_state_numel
from metalora_core.meta.distributed import DistContext, gather_to_main

LAYOUT = BankLayout({"a.qkv": 12, "b.proj": 8}, rank_down=2, rank_mid=3)


def _downs():
    g = torch.Generator().manual_seed(0)
    return {
        "a.qkv": nn.Parameter(torch.randn(2, 6, generator=g)),
        "b.proj": nn.Parameter(torch.randn(2, 6, generator=g)),
    }


def _loss(heads: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return sum((heads[head_key(n)](x) - 0.1).pow(2).sum() for n in LAYOUT.outs)


def test_optimizer_state_follows_the_batch_not_the_bank():
    downs = _downs()
    small, large = HeadBank(LAYOUT, range(3)), HeadBank(LAYOUT, range(300))
    sizes = []
    for bank in (small, large):
        heads, opt = bank.page_in([0, 2], downs, 1.0, 1e-2, 0.0, "cpu")
        _loss(heads[0], torch.randn(4, 6)).backward()
        _loss(heads[2], torch.randn(4, 6)).backward()
        opt.step()
        sizes.append(optimizer_state_numel(opt))
    # two moments of Mid and of Up, plus AdamW's step counter per parameter
    per_identity = sum(2 * (3 * 2 + o * 3) + 2 for o in LAYOUT.outs.values())
    assert sizes == [2 * per_identity, 2 * per_identity]
    assert all(p is downs[n] for n, p in ((n, heads[0][head_key(n)].down) for n in LAYOUT.outs))


def test_paged_adamw_matches_a_resident_adamw_step_for_step():
    """Three steps of identity 1 through page-in/out equal three steps of a head that never left."""
    downs = _downs()
    bank = HeadBank(LAYOUT, [1], seed=4)
    init = LAYOUT.initial(1, seed=4)
    resident = nn.ModuleDict(
        {
            head_key(n): IdentityHead(
                downs[n].detach().clone(), o, 3, 1.0, init[f"1.{n}.mid"], init[f"1.{n}.up"]
            )
            for n, o in LAYOUT.outs.items()
        }
    )
    ref = torch.optim.AdamW(resident.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 6, generator=g, dtype=torch.float32)
        heads, opt = bank.page_in([1], downs, 1.0, 1e-2, 0.1, "cpu")
        _loss(heads[1], x).backward()
        opt.step()
        bank.page_out(heads, opt)
        _loss(resident, x).backward()
        ref.step()
        ref.zero_grad()
    for n in LAYOUT.outs:
        torch.testing.assert_close(
            bank.tensors[f"1.{n}.up"], resident[head_key(n)].up.detach(), rtol=0, atol=0
        )
        torch.testing.assert_close(
            bank.tensors[f"1.{n}.mid"], resident[head_key(n)].mid.detach(), rtol=0, atol=0
        )
        state = ref.state[resident[head_key(n)].up]
        torch.testing.assert_close(bank.tensors[f"1.{n}.up.exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)
    assert float(bank.tensors["1.step"]) == 3.0


def test_initial_heads_depend_on_the_identity_alone():
    """A process owning identities {1, 3} builds exactly the heads a single process builds for them."""
    whole, part = HeadBank(LAYOUT, range(4), seed=2), HeadBank(LAYOUT, [1, 3], seed=2)
    assert set(part.tensors) < set(whole.tensors)
    for k, v in part.tensors.items():
        assert torch.equal(v, whole.tensors[k])
    assert not torch.equal(whole.tensors["0.a.qkv.mid"], whole.tensors["1.a.qkv.mid"])
    full = gather_to_main(DistContext(), part.tensors, {k: tuple(v.shape) for k, v in whole.tensors.items()})
    assert torch.equal(full["1.a.qkv.mid"], part.tensors["1.a.qkv.mid"])
    assert not full["0.a.qkv.mid"].any()  # not owned here: zeros for the owner to fill in the reduce
