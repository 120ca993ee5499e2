"""Run jaxtune training on a Ray cluster: one process per node, joined by jax.distributed.

    python launch/ray_job.py --nodes=4 --gpus-per-node=8 -- \
        --config=configs/lora_llama.py --workdir=/mnt/shared/runs/lora-ray --config.mesh.shape=4,8,1

or submitted as a Ray job (the script runs on the head node and fans out):

    ray job submit --working-dir . -- python launch/ray_job.py --nodes=4 --gpus-per-node=8 -- --config=...

What it does: reserves one bundle per node (a STRICT_SPREAD placement group, so no two processes
share a node), asks the first worker for its IP and a free port (the coordinator), then starts
`python -m jaxtune.train FLAGS...` on every worker with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID set; jaxtune.distributed.maybe_initialize() reads them. It waits for all of them
and exits non-zero if any process failed (their output streams to the Ray driver log).

Adapt: --gpus-per-node (0 on CPU-only clusters: add --cpu-devices-per-node to simulate devices
for a dry run), the runtime environment (ray.init(runtime_env=...) or an image with jaxtune
installed on every node), and the workdir, which must be on storage every node can reach. The mesh
must use every device of the job and split the batch over a multiple of --nodes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, required=True, help="processes to start, one per node")
    parser.add_argument("--gpus-per-node", type=float, default=0, help="GPUs to reserve per process")
    parser.add_argument("--cpus-per-node", type=float, default=1, help="CPUs to reserve per process")
    parser.add_argument("--cpu-devices-per-node", type=int, default=0,
                        help="CPU-only dry run: simulated CPU devices per process (sets XLA_FLAGS, JAX_PLATFORMS=cpu)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the running cluster)")
    if "--" in argv:
        split = argv.index("--")
        own, train_flags = argv[:split], argv[split + 1:]
    else:
        own, train_flags = argv, []
    args = parser.parse_args(own)
    if not train_flags:
        parser.error("give the jaxtune.train flags after --, e.g. -- --config=configs/lora_llama.py --workdir=...")
    return args, train_flags


def process_env(coordinator: str, num_processes: int, process_id: int, cpu_devices: int) -> dict[str, str]:
    """The variables one training process needs on top of the node's environment."""
    env = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(num_processes),
           "JAX_PROCESS_ID": str(process_id)}
    if cpu_devices:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}")
    return env


def main(argv: list[str]) -> int:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    args, train_flags = parse_args(argv)
    ray.init(address=args.address)
    bundle = {"CPU": args.cpus_per_node, **({"GPU": args.gpus_per_node} if args.gpus_per_node else {})}
    group = placement_group([dict(bundle) for _ in range(args.nodes)], strategy="STRICT_SPREAD")
    ray.get(group.ready())

    @ray.remote
    class TrainProcess:
        """One jaxtune.train process on one node."""

        def coordinator_address(self) -> str:
            import socket

            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            return f"{ray.util.get_node_ip_address()}:{port}"

        def train(self, env: dict[str, str], flags: list[str]) -> int:
            # Ray sets CUDA_VISIBLE_DEVICES to the GPUs of this bundle: exactly this node's share.
            return subprocess.run([sys.executable, "-m", "jaxtune.train", *flags],
                                  env={**os.environ, **env}).returncode

    workers = [
        TrainProcess.options(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(
                                 placement_group=group, placement_group_bundle_index=i)).remote()
        for i in range(args.nodes)]
    coordinator = ray.get(workers[0].coordinator_address.remote())
    print(f"ray_job: {args.nodes} processes, coordinator {coordinator}", flush=True)
    codes = ray.get([worker.train.remote(process_env(coordinator, args.nodes, i, args.cpu_devices_per_node),
                                         train_flags) for i, worker in enumerate(workers)])
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        print(f"ray_job: processes {failed} failed (exit codes {[codes[i] for i in failed]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
