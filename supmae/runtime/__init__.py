"""Where and how a step runs: the device, precision and compile policy, and the ranks of a torchrun world."""
