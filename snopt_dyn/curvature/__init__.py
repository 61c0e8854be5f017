"""The pieces of :class:`snopt_dyn.SNOpt`, one job each.

* :mod:`.batching`     -- how the batch size of a solve is found, which backward pass we are in,
                          per-sample cotangents for layers whose rows serve the whole batch;
* :mod:`.statistics`   -- per-layer accumulation of the Kronecker factors; **how G is scaled**;
* :mod:`.pairing`      -- the extra field evaluations at the sample times, each layer call paired
                          with its own output gradient;
* :mod:`.ekfac`        -- eigenbases, the second moment in the eigenbasis, the update;
* :mod:`.trust_region` -- the optional KL clip on the preconditioned step;
* :mod:`.distributed`  -- averaging over ``torch.distributed`` ranks in one collective;
* :mod:`.checkpoint`   -- ``state_dict`` / ``load_state_dict`` with name, shape, dtype and device checks;
* :mod:`.lifecycle`    -- the layer hooks: registered on refresh iterations only, removed with SNOpt,
                          and the detection of layers evaluated by another library's solver.
"""
