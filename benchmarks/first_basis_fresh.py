"""``snopt-dyn compare`` where ``first_basis`` restarts Adam's moments at the first eigenbasis.

``SNOpt(rule="adam", first_basis=D)`` carries the moments of its ``D`` steps in the weights' own basis
into the first eigenbasis.  Carried there, the second moment is spread over the eigen-coordinates
(:mod:`snopt_dyn.curvature.basis_change`), which damps the weak ones, as ``relative_eps`` does.  This
diagnostic restarts both moments at the first basis instead (later rebuilds still carry them), so
the eigenbasis gets Adam's sign-like first steps as in a run from iteration 0.  Every SNOpt run of the
command with ``first_basis`` is patched; a run without it is unaffected and is the reference
(BENCHMARKS.md §6, ninth round)::

    python benchmarks/first_basis_fresh.py --data GunPoint_TRAIN.ts,GunPoint_TEST.ts --seeds 3 \\
        --eval-points 8 --optimizers "snopt,snopt[first_basis=10],adamw-cosine"
"""
from __future__ import annotations

import sys

import snopt_dyn
from snopt_dyn.compare.cli import main

_carry = snopt_dyn.SNOpt._new_moments


def _fresh_at_first_basis(self, st, kronecker, old_g, old_a):
    if old_a is None and self.first_basis:
        st.m1 = st.m2 = None  # zeros (and a new bias-correction count) at the next update
        return None
    return _carry(self, st, kronecker, old_g, old_a)


if __name__ == "__main__":
    snopt_dyn.SNOpt._new_moments = _fresh_at_first_basis
    sys.exit(main(["compare", *sys.argv[1:]]))
