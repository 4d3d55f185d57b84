from fused_optim.optim.adam import Adam, AdamW
from fused_optim.optim.lion import Lion
from fused_optim.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
