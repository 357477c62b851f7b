"""The ranges the numbers a user gives must lie in. Nothing heavy is imported here, so the command line can check its
arguments before torch and diffusers load."""

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0
MAX_NUM = 1000
LARGEST_SIDE = 4  # times the model's native side: larger sizes only repeat the picture and exhaust memory
