"""torch.library ops: schemas, fake impls and backend choice (docs/design.md, the ops layer). Importing this defines every op,
then loads the C++ extensions that add their CPU and CUDA kernels."""

from fused_optim import _backend
from fused_optim.ops import accumulate, adam, cross_entropy, lion, sgd, total_norm, triad  # noqa: F401  (defines the schemas)

_backend.load_extensions()
