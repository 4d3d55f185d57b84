"""autograd.Functions that put the fused ops (fused_optim/ops) into torch's autograd: what they save, what their
backward computes. The public functions with torch's signatures are in fused_optim/functional.py."""
