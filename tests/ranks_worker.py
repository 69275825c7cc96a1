"""A rank of a two-chip job, run under torchrun by test_ranks.py: FL_PATCH_REPORT=1 and the bootstrap come from
the environment; this script only stands in for the device (CPU tensors taken as tensors of the device that
$STAND_IN_DEVICES, a JSON list, gives this rank), then runs a few patched calls over gloo.

argv[1]: "destroy" to end with destroy_process_group() (the report is exchanged then), "exit" to leave the group up.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fl_patch.device import devices
from fl_patch.kernels import gems

rank = int(os.environ["RANK"])
device = json.loads(os.environ["STAND_IN_DEVICES"])[rank]
gems.device_reason = lambda tensor: None
devices.identify = lambda torch_device: devices.DeviceInfo(device["vendor"], device["type"], device["name"])

dist.init_process_group("gloo")
x, weight = torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
F.rms_norm(x, (64,), weight, 1e-6)
F.linear(x, torch.randn(32, 64, dtype=torch.bfloat16))
total = torch.tensor([1.0])
dist.all_reduce(total)
assert total.item() == dist.get_world_size()
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
