"""``snopt-dyn compare`` with every eigenbasis forced to the identity: does the rotation itself help?

With identity bases SNOpt's Adam rule is Adam (``tests/test_update_rules.py``), so a run of
``snopt[rule=adam;...]`` here against ``adamw-cosine`` in the same process tells whether the gap of
an ordinary run comes from the Kronecker eigenbasis or from anything else (rates, schedule, the
layers SNOpt leaves to its base optimizer).  Every SNOpt run of the command gets identity bases, so
compare the gap to AdamW-cosine with the one of an ordinary run of the same seeds
(BENCHMARKS.md §6, ninth round)::

    python benchmarks/identity_basis.py --task latent --data ItalyPowerDemand_TRAIN.ts,ItalyPowerDemand_TEST.ts \\
        --seeds 3 --eval-points 8 --optimizers "snopt[rule=adam;power=0.5]@1e-2,adamw-cosine,adam"
"""
from __future__ import annotations

import sys

import torch

from snopt_dyn.compare.cli import main
from snopt_dyn.curvature import ekfac


def identity_eigh(mat: torch.Tensor, name: str):
    """Stands in for :func:`ekfac.eigh`: unit eigenvalues, the identity as the basis."""
    n = mat.shape[0]
    return (torch.ones(n, dtype=mat.dtype, device=mat.device),
            torch.eye(n, dtype=mat.dtype, device=mat.device))


if __name__ == "__main__":
    ekfac.eigh = identity_eigh
    sys.exit(main(["compare", *sys.argv[1:]]))
