"""Plain PyTorch examples the `fused-optim train` command runs: a small GPT (gpt.py) and its byte-level corpus
(data.py). Nothing here depends on fused_optim: they are what a user's own model and data would be."""
