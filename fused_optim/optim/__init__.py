from fused_optim.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
