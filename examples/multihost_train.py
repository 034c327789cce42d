"""LoRA training of the reference decoder over several processes (multi-host).

Every process runs this same program (SPMD). Arrays are global: each process
holds the shards on its own devices, `jax.jit` runs the step on all of them,
and XLA's collectives cross process boundaries. The program never gathers
the base model anywhere.

Run 2 CPU processes x 4 devices on this machine (what the tests do)::

    python examples/launch_multihost.py --num-processes 2 --local-devices 4 -- \\
        --steps 5 --mesh 2x4 --ckpt /tmp/lora_ckpt

or one process by hand per terminal::

    python examples/multihost_train.py --coordinator localhost:12355 \\
        --num-processes 2 --process-id 0 --local-devices 4
    python examples/multihost_train.py --coordinator localhost:12355 \\
        --num-processes 2 --process-id 1 --local-devices 4

On a GPU cluster or a TPU pod slice, start one process per host (SLURM,
``gcloud compute tpus tpu-vm ssh --worker=all``, Kubernetes...) with
``--cluster``: ``jax.distributed.initialize()`` then reads the coordinator,
process count and id from the environment. ``--mesh`` gives the
(data, model) mesh over all devices; ``model`` should not exceed one host's
devices (tensor parallelism over NVLink / ICI), ``data`` spans hosts. The
checkpoint directory must be on storage every host sees (NFS, GCS).

The same program with ``--num-processes 1 --local-devices 8`` gives the
single-process reference: the losses should agree to f32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coordinator", help="host:port of process 0 (CPU / explicit setup)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--local-devices", type=int, default=0,
                   help="CPU devices per process (CPU runs only; 0 = the backend's own)")
    p.add_argument("--cluster", action="store_true",
                   help="GPU/TPU cluster: jax.distributed.initialize() from the environment")
    p.add_argument("--mesh", default="2x4", help="DATAxMODEL over all devices, e.g. 2x4")
    p.add_argument("--model", choices=("reference", "small"), default="reference")
    p.add_argument("--batch", type=int, default=8, help="global batch (examples)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", help="checkpoint directory (shared by all processes)")
    p.add_argument("--out", help="process 0 writes a JSON summary here")
    return p.parse_args(argv)


def setup_jax(args):
    """Configures and starts JAX's distributed runtime (before any computation)."""
    import jax

    if args.local_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.cluster:
        jax.distributed.initialize()
    elif args.num_processes > 1:
        # CPU collectives across processes go through gloo (TCP); GPUs use
        # NCCL and TPUs ICI without any setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    return jax


def main(argv=None) -> dict:
    args = parse_args(argv)
    jax = setup_jax(args)

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lora_jax as lj
    from examples import gpt

    t0 = time.perf_counter()
    phases = {}

    cpu = {}

    def phase(name):  # wall (and this process's CPU) seconds since the previous phase
        phases[name] = round(time.perf_counter() - t0 - sum(phases.values()), 2)
        cpu[name] = round(time.process_time() - sum(cpu.values()), 2)
    data, model_axis = (int(n) for n in args.mesh.split("x"))
    if data * model_axis != jax.device_count():
        raise SystemExit(f"--mesh {args.mesh} needs {data * model_axis} devices; there are "
                         f"{jax.device_count()} ({jax.process_count()} processes x "
                         f"{jax.local_device_count()}).")
    # make_mesh puts the last (model) axis on devices of one process where it can.
    mesh = jax.make_mesh((data, model_axis), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    cfg = gpt.REFERENCE if args.model == "reference" else gpt.GPTConfig(
        vocab=128, d_model=64, n_heads=4, n_layers=1, d_mlp=128, max_len=16)
    model = gpt.GPT(cfg)
    col, row = r".*/(q|k|v|fc1)", r".*/(o|fc2)"
    rules = {  # tensor parallel over 'model', FSDP over 'data'
        col + "/kernel": P("data", "model"), col + "/bias": P("model"),
        row + "/kernel": P("model", "data"),
        r"params/lm_head/kernel": P("data", "model"),
        r"params/(wte/embedding|wpe)": P(None, "data")}

    config = lj.LoraConfig(targets=gpt.TARGETS, rank=8, alpha=16)
    tx = lj.optimizer(optax.adam(args.lr))
    # Shardings first, from shapes alone; then params, adapters and optimizer
    # state are created already sharded, in one program: no process ever
    # holds the whole model.
    dummy = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)
    param_sh = lj.param_shardings(abstract, mesh, rules=rules)
    sh = lj.train_shardings(abstract, config, tx, batch=P("data"), shardings=param_sh)

    def create(key):
        params = model.init(key, dummy)
        adapters = lj.init(params, config, key=jax.random.fold_in(key, 1))
        return params, adapters, tx.init(adapters)

    params, adapters, opt_state = jax.jit(
        create, out_shardings=(sh.params, sh.adapters, sh.opt_state))(jax.random.key(args.seed))

    forward = lj.apply(model.apply, config)

    def loss_fn(params, adapters, tokens):
        return gpt.causal_lm_loss(forward(params, adapters, tokens[:, :-1]), tokens[:, 1:])

    step = lj.make_sharded_train_step(loss_fn, tx, sh)
    phase("init")

    # The same global batch on every process (seeded); each process fills
    # only the shards on its own devices.
    rng = np.random.default_rng(args.seed)
    batches = [rng.integers(0, cfg.vocab, (args.batch, cfg.max_len + 1), dtype=np.int32)
               for _ in range(2)]
    batches = [jax.make_array_from_callback(b.shape, sh.batch[0], lambda idx, b=b: b[idx])
               for b in batches]

    def scalar(x):  # a replicated global scalar, read from this process's shard
        return float(np.asarray(x.addressable_shards[0].data))

    losses = []
    for i in range(args.steps):
        adapters, opt_state, loss = step(params, adapters, opt_state, batches[i % 2])
        losses.append(scalar(loss))
        if i == 0:
            phase("first_step")
        if jax.process_index() == 0:
            print(f"step {i}: loss {losses[-1]:.6f}", flush=True)
    phase("steps")

    summary = {"processes": jax.process_count(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "mesh": dict(mesh.shape),
               "model": args.model, "losses": losses, "seconds": phases, "cpu_seconds": cpu,
               "backend": jax.default_backend(), "jax": jax.__version__}

    if args.ckpt:
        # Every process calls save and restore; Orbax writes each process's
        # shards, process 0 the metadata. The directory is shared.
        # (params=: the base fingerprint, checked again by restore_state)
        step_no = lj.save(args.ckpt, adapters, config, step=args.steps, params=params,
                          opt_state=opt_state)
        phase("save")
        state, config2 = lj.restore_state(
            args.ckpt, params=params, step=step_no, shardings=sh.adapters,
            opt_state_like=jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                opt_state, sh.opt_state))
        same = jax.jit(lambda a, b: jnp.all(jnp.stack([
            jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])),
            out_shardings=sh.scalar)
        restored_equal = bool(np.asarray(same((state.adapters, state.opt_state),
                                               (adapters, opt_state)).addressable_data(0)))
        phase("restore")
        # and training resumes from the restored state with the same compiled step
        _, _, loss = step(params, state.adapters, state.opt_state, batches[args.steps % 2])
        summary.update(checkpoint=args.ckpt, saved_step=step_no, restored_equal=restored_equal,
                       config_equal=config2 == config, loss_after_restore=scalar(loss))
        if jax.process_index() == 0:
            print(f"saved step {step_no} to {args.ckpt}; restored bit-exact: {restored_equal}; "
                  f"next loss {summary['loss_after_restore']:.6f}", flush=True)

    if args.out and jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
