"""bench/one_photo.py: its photo generator has the asked-for geometry, and its smoke run ends with its ratios.

The generator is bench/prior.py's, extended by a nuisance family: these tests pin what the bench's claims
rest on (the nuisance input subspace sits at the asked-for angle to the identity's, with the asked-for
energy; the true identity change scores 0 against the identity-only teacher and not against a photo).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.benches import load_bench


def _load(name: str):
    return load_bench(name, f"{name}_bench_test")


@pytest.fixture(scope="module")
def prior():
    return _load("prior")


@pytest.fixture(scope="module")
def setup(prior, assets):
    backend = prior.DiffusersBackend.from_path(assets["bfl"])
    args = argparse.Namespace(
        seed=0, family_dim=8, true_rank=4, private=0.15, strength=0.3, nuisance=0.7, overlap=0.2
    )
    return backend, prior.Family(backend, args), args


def _principal_cos2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos^2 of the principal angles between the row spaces of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb).pow(2)


def test_nuisance_subspace_sits_at_the_asked_for_angle(setup):
    _, family, args = setup
    for name, u in family.U.items():
        assert torch.allclose(u @ u.T, torch.eye(args.true_rank), atol=1e-5), name  # orthonormal rows
        cos2 = _principal_cos2(u, family.V[name])
        assert torch.allclose(cos2, torch.full_like(cos2, args.overlap), atol=1e-5), (name, cos2)


def test_nuisance_energy_is_the_asked_for_share_of_the_identitys(setup):
    _, family, args = setup
    change, nuisance = family.change(7), family.nuisance_change(7, 2)
    for name, (down, up) in change.items():
        identity = (up @ down).double().pow(2).sum()
        u, n_up = nuisance[name]
        energy = (n_up @ u).double().pow(2).sum()
        assert abs(float(energy / identity) - args.nuisance) < 1e-4, name
    other = family.nuisance_change(7, 3)
    assert not torch.allclose(other[name][1], nuisance[name][1])  # each photo draws its own nuisance
    assert torch.equal(family.nuisance_change(7, 2)[name][1], nuisance[name][1])  # and the same one again


def test_the_true_identity_change_scores_zero_against_the_identity_not_against_a_photo(prior, setup):
    backend, family, _ = setup
    identity = prior.Task(backend, family.teacher(5), 1234, 2)
    photo = prior.Task(backend, family.photo(5, 1), 1234, 2)
    with torch.no_grad(), backend.adapters(family.teacher(5)):
        assert float(identity.loss()) < 1e-10
        assert float(photo.loss()) > 0.05  # the photo's nuisance is left: an identity-only model can't fit it
    with torch.no_grad():
        assert abs(float(identity.loss()) - 1.0) < 1e-6  # the base model: nothing learned, by construction


def test_quick_run_ends_with_its_ratios(capsys):
    assert _load("one_photo").main(["--quick", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("ratio heldout_photos_meta_over_lora ")
    name, value = lines[-1].rsplit(" ", 1)
    assert name == "ratio heldout_photos_distilled_over_lora" and float(value) > 0
    table = [line for line in lines if line.startswith("meta ")]
    assert len(table) == 2  # one row per nuisance level of --quick (0 and 1)
    cols = table[0].split()
    assert float(cols[5]) == float(cols[6])  # no nuisance: the other photos ARE the identity (other = ident)
