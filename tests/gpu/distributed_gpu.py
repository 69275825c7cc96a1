"""fl_patch's FlagCX default on two GPUs, with real FlagCX or tests/gpu/flagcx_nccl_standin (NCCL under its name).

Run by torchrun with the bootstrap on PYTHONPATH (tests/gpu/distributed_gpu.sh does the three runs: stand-in,
FL_PATCH_DIST=native, real FlagCX); the script itself is plain torch.distributed, written as LightX2V and most
trainers call it (backend "nccl", NCCL-only pg_options):

    PYTHONPATH=tests/gpu/flagcx_nccl_standin:.:sitecustomize torchrun --nproc-per-node 2 \\
        tests/gpu/distributed_gpu.py --out distributed.json

Rank 0 writes what it saw: the backend string, how many groups the stand-in made, the results of all_reduce /
all_gather / broadcast on CUDA and CPU tensors, of a new_group and of a device mesh, and fl_patch's records.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl", pg_options=dist.ProcessGroupNCCL.Options())
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = {"backend": str(dist.get_backend()), "world_size": world}

    cuda = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(cuda)
    cpu = torch.tensor([rank + 1.0])
    cpu_collectives = "cpu:" in seen["backend"] or seen["backend"] == "gloo"  # plain NCCL has none
    if cpu_collectives:
        dist.all_reduce(cpu)
    gathered = [torch.empty(2, device="cuda") for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([rank, rank * 10.0], device="cuda"))
    source = torch.arange(4.0, device="cuda") if rank == 0 else torch.zeros(4, device="cuda")
    dist.broadcast(source, src=0)
    group = dist.new_group(list(range(world)))
    on_group = torch.ones(8, device="cuda")
    dist.all_reduce(on_group, group=group)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    on_mesh = torch.full((4,), 2.0, device="cuda")
    dist.all_reduce(on_mesh, group=mesh.get_group())
    torch.cuda.synchronize()
    expected = world * (world + 1) / 2
    seen["results"] = {
        "all_reduce cuda": cuda[0].item(),
        "all_reduce cpu": cpu.item() if cpu_collectives else f"no CPU backend in {seen['backend']!r}",
        "all_gather cuda": [t.tolist() for t in gathered], "broadcast cuda": source.tolist(),
        "new_group all_reduce": on_group[0].item(), "new_group backend": str(dist.get_backend(group)),
        "device_mesh all_reduce": on_mesh[0].item(),
    }
    seen["correct"] = (cuda.eq(expected).all().item() and (cpu.item() == expected or not cpu_collectives)
                       and gathered[world - 1].tolist() == [world - 1, (world - 1) * 10.0]
                       and source.tolist() == [0.0, 1.0, 2.0, 3.0] and on_group[0].item() == world
                       and on_mesh[0].item() == 2.0 * world)
    flagcx = sys.modules.get("flagcx")
    seen["flagcx_module"] = getattr(flagcx, "__file__", None)
    if hasattr(flagcx, "CREATED"):  # the stand-in counts its groups; real FlagCX does not
        seen["flagcx_groups_made_on_this_rank"] = len(flagcx.CREATED)
    fl_patch = sys.modules.get("fl_patch")
    seen["fl_patch"] = ([r for r in fl_patch.report() if r["family"] == "distributed"]
                        if fl_patch else "not loaded")
    seen["device"] = torch.cuda.get_device_name(local_rank)
    seen["torch"] = torch.__version__
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(args.out, "w") as handle:
            json.dump(seen, handle, indent=1)
        print(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main()
