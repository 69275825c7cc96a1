"""A plain torch.distributed script, no fl_patch in it: init with no backend, all_reduce, print the backend.

Under fl_patch (FL_PATCH_DIST=auto, the default) FlagCX becomes the default backend when it is installed:

    fl-patch run -- torchrun --nproc-per-node 2 examples/distributed_allreduce.py

Without FlagCX (a CPU machine), the gloo-backed stand-in in tests/flagcx_standin registers itself under the
name "flagcx" through the same torch call FlagCX makes, so the switch can be seen anywhere:

    PYTHONPATH=tests/flagcx_standin fl-patch run -- torchrun --nproc-per-node 2 \
        --master-addr 127.0.0.1 examples/distributed_allreduce.py
    FL_PATCH_DIST=native PYTHONPATH=tests/flagcx_standin fl-patch run -- torchrun ...   # stays on gloo/nccl
"""

import sys

import torch
import torch.distributed as dist

dist.init_process_group()  # no backend: torch's default for the device, or FlagCX under fl_patch
value = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(value)
# One write per line, so the ranks' lines don't interleave on a shared terminal.
sys.stdout.write(f"rank {dist.get_rank()}/{dist.get_world_size()}: backend {dist.get_backend()}, "
                 f"all_reduce sum {value.item():g}\n")
sys.stdout.flush()
dist.destroy_process_group()
