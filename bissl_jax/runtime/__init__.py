"""What a run needs from its machine: the device mesh, the CPU kernels, determinism,
seed derivation, and the errors that stop a run with a message."""
