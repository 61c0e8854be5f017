"""The pieces of :class:`snopt_dyn.SNOpt`, one job each.

* :mod:`.batching`     -- how the batch size of a solve is found, which backward pass we are in,
                          per-sample cotangents for layers whose rows serve the whole batch;
* :mod:`.statistics`   -- per-layer accumulation of the Kronecker factors; **how G is scaled**;
* :mod:`.pairing`      -- the extra field evaluations at the sample times, each layer call paired
                          with its own output gradient;
* :mod:`.ekfac`        -- eigenbases, the second moment in the eigenbasis, today's update
                          (``rule="ekfac"``);
* :mod:`.eigen_adam`   -- Adam in the eigenbasis (``rule="adam"``): moments, bias correction, power;
* :mod:`.basis_change` -- carrying the moments into a new basis at a rebuild;
* :mod:`.factor_average` -- the factors as a running average across refreshes (``factor_ema``);
* :mod:`.warm_basis`   -- one power iteration + QR between full eigendecompositions (``eigh_every``);
* :mod:`.burn_in`      -- which iterations sample and rebuild, and whether a rebuild follows the update;
* :mod:`.weight_decay` -- decoupled weight decay, for every rule;
* :mod:`.trust_region` -- the optional KL clip on the preconditioned step;
* :mod:`.distributed`  -- averaging over ``torch.distributed`` ranks in one collective;
* :mod:`.checkpoint`   -- ``state_dict`` / ``load_state_dict`` with name, shape, dtype and device checks;
* :mod:`.lifecycle`    -- the layer hooks: registered on refresh iterations only, removed with SNOpt,
                          and the detection of layers evaluated by another library's solver.
"""
