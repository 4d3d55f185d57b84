"""The tooling around the library, apart from it: `fused-optim bench` (bench/), `fused-optim train` (training/, over
the plain-PyTorch model and data of examples/), and the command line (cli/). `import fused_optim` loads none of it."""
