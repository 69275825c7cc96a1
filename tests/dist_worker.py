"""A plain torch.distributed script with no fl_patch in it, run under torchrun by test_distributed.py.

argv[1]: a folder; argv[2]: "default" (init_process_group() with no backend) or a backend name passed as
is; argv[3], if given, is the backend of a new_group made next. Each rank writes rank<N>.json in the
folder: the backends, the all_reduce sums, and how many groups the flagcx stand-in made.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group(backend=None if sys.argv[2] == "default" else sys.argv[2])
value = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(value)
subgroup = dist.new_group(backend=sys.argv[3]) if len(sys.argv) > 3 else None
sub_value = torch.ones(1)
if subgroup is not None:
    dist.all_reduce(sub_value, group=subgroup)
flagcx = sys.modules.get("flagcx")
result = {
    "rank": dist.get_rank(),
    "backend": str(dist.get_backend()),
    "subgroup_backend": str(dist.get_backend(subgroup)) if subgroup is not None else None,
    "sum": value.item(),
    "sub_sum": sub_value.item(),
    "flagcx_groups": len(flagcx.CREATED) if flagcx is not None else 0,
}
Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
dist.destroy_process_group()
