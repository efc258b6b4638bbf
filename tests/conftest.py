import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny test models are dominated by per-op overhead: one thread is faster than two spinning threads
# and makes timings independent of whatever else runs on the machine.
torch.set_num_threads(1)
