"""Train a recurrent-depth transformer (or a GPT baseline) from one YAML file.

    python train.py                                   # launch_configs/debug.yaml: tiny model, embedded corpus, CPU
    python train.py --config launch_configs/X.yaml key.sub=value ...
    python train.py --print-config [--config X.yaml] [key=value ...]
    torchrun --nproc_per_node 2 train.py              # the same run over two processes

Flow, top to bottom: settings -> fabric -> data -> model -> optimizer -> resume -> loop -> final checkpoint.
Everything is validated before the run folder is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recpre import xla as xla_helpers
from recpre.checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_FILE,
    CheckpointSaveError,
    check_resumable,
    check_same_shape,
    find_latest,
    list_checkpoints,
    load_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from recpre.errors import UserError, run_cli
from recpre.fabric import FabricError, SimpleFabric
from recpre.flops import device_peak, mfu, training_flops_per_token
from recpre.model import build_model, compile_blocks, sample_depth
from recpre.monitor import Monitor, Throughput
from recpre.optim import build_optimizer, load_optimizer_state
from recpre.preemption import StopRequest, stop_code
from recpre.schedules import BatchPlan, learning_rate
from recpre.settings import load_settings, model_config, save_settings, settings_to_yaml, validate_for_world
from recpre.training import (
    LossSpikeGuard,
    TrainingAborted,
    count_targets,
    debug_nan_steps,
    eval_depths,
    model_inputs,
    poison_gradients,
    set_learning_rate,
    validate,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a recurrent-depth transformer or GPT baseline from a YAML config plus key=value overrides.",
        epilog="Example: python train.py --config launch_configs/debug.yaml train.max_steps=50 optim.lr=3e-4",
    )
    parser.add_argument("--config", default=None, help="run config (YAML); default launch_configs/debug.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument(
        "--compile-sweep",
        action="store_true",
        help="XLA/Trainium: run a few steps that visit every graph the run needs (for neuron_parallel_compile) "
        "into OUT_DIR/compile-sweep; no checkpoint is written",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


# -- data -----------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: list[str]
    val: list[str]
    eos_id: int | None
    vocab_size: int | None
    source: str


def prepare_data(settings: Any, config: Any, fabric: SimpleFabric) -> Data:
    """Paths of the train/val sources; the embedded corpus is built once (rank 0 first) and cached."""
    d = settings.data
    if d.train:
        eos_id, vocab = config.eos_id, None
        if d.tokenizer:
            from recpre.data.tokenizer import load_tokenizer

            tok = load_tokenizer(d.tokenizer)
            eos_id, vocab = tok.eos_id if eos_id is None else eos_id, tok.vocab_size
        return Data(list(d.train), list(d.val), eos_id, vocab, "data.train")
    from recpre.data.corpus import prepare_embedded_corpus

    if not fabric.is_main:
        fabric.barrier()
    corpus = prepare_embedded_corpus(config.block_size, cache_dir=d.cache_dir)
    if fabric.is_main:
        fabric.barrier()
    val = list(d.val) if d.val else list(corpus.val)
    eos_id = config.eos_id if config.eos_id is not None else corpus.eos_id
    return Data(list(corpus.train), val, eos_id, corpus.vocab_size, "embedded corpus")


def make_loader(settings: Any, config: Any, fabric: SimpleFabric, data: Data, *, val: bool = False) -> Any:
    from recpre.data.loader import PackedLoader

    return PackedLoader(
        data.val if val else data.train,
        block_size=config.block_size,
        micro_batch_size=(settings.eval.micro_batch_size or settings.train.micro_batch_size)
        if val
        else settings.train.micro_batch_size,
        rank=fabric.rank,
        world_size=fabric.world_size,
        seed=settings.run.seed,
        weights=None if val else settings.data.weights,
        eos_id=data.eos_id,
        num_epochs=1 if val else None,
        prefetch=0 if val else settings.data.prefetch,
    )


def first_batches(loader: Any, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` micro-batches of a loader (the fixed validation set)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= count:
            break
    return batches


# -- resume ---------------------------------------------------------------------------------------------


def find_resume(settings: Any, run_dir: Path, config: Any) -> Path | None:
    """The checkpoint this run continues from (run.resume: auto | never | a path), shape-checked."""
    resume = str(settings.run.resume)
    root = run_dir / CHECKPOINTS_DIR
    if resume == "never":
        if list_checkpoints(root):
            raise UserError(
                f"{run_dir} already holds checkpoints and run.resume=never; set run.resume=auto to continue it, "
                "or choose another run.name / run.out_dir"
            )
        return None
    ckpt = find_latest(root) if resume == "auto" else resolve_checkpoint(resume)
    if ckpt is None and list_checkpoints(root):
        # Starting over would overwrite metrics.jsonl and, with checkpoint.keep, prune the damaged checkpoints.
        raise UserError(
            f"none of the checkpoints in {root} verifies (see the warnings above); restore a good one, set "
            "run.resume to a checkpoint folder, or move them away to start this run over"
        )
    if ckpt is not None:
        check_same_shape(ckpt, config.to_dict())
        check_resumable(ckpt, settings_to_yaml(settings))
    return ckpt


def agree_on_checkpoint(settings: Any, run_dir: Path, config: Any, fabric: SimpleFabric) -> Path | None:
    """Rank 0 finds and verifies the checkpoint (hashing it once, not once per rank) and tells every rank,
    so that all ranks load the same one even when their views of a shared filesystem lag."""
    found: tuple[str, Any] = ("ok", None)
    if fabric.is_main:
        try:
            found = ("ok", find_resume(settings, run_dir, config))
        except UserError as err:
            found = ("error", str(err))
    kind, value = fabric.broadcast_object(found) if fabric.world_size > 1 else found
    if kind == "error":
        raise UserError(value)
    return value


def optimizer_identity(settings: Any) -> dict[str, Any]:
    """What an optimizer state is only valid for: the rule and the parameter grouping."""
    return {"name": settings.optim.name, "no_decay": list(settings.optim.no_decay)}


def restore(ckpt: Path, settings: Any, fabric: SimpleFabric, model, optimizer, progress, guard, loader) -> None:
    """Weights, optimizer moments, counters, guardrail, data position and RNG, exactly where they were;
    hyperparameters (lr, weight decay, betas) come from this run's settings."""
    state = load_state(ckpt, fabric.rank)
    if fabric.strategy == "xla":  # -- xla: safetensors reads into CPU weights, then onto the device
        empty = build_model(fabric.unwrap(model).config, device="meta")
        xla_helpers.load_through_cpu(model, empty, lambda m: load_weights(m, ckpt / MODEL_FILE))
    else:
        load_weights(model, ckpt / MODEL_FILE)  # verified by rank 0 in agree_on_checkpoint
    if "optimizer" not in state:  # imported weights (evaluate/import_huginn.py): training starts at step 0
        fabric.print(f"starting from the weights of {ckpt} (no optimizer state: an imported checkpoint)")
        return
    if state.get("world_size", fabric.world_size) != fabric.world_size:
        raise UserError(
            f"checkpoint {ckpt} was written by {state['world_size']} ranks but this run has {fabric.world_size}; "
            f"resume with the same number of ranks, or start a new run with run.init_from={ckpt}"
        )
    saved, current = state.get("optim"), optimizer_identity(settings)
    if saved is not None and saved != current:
        raise UserError(
            f"checkpoint {ckpt} holds optimizer state for {saved} but this run uses {current}; resume with the "
            f"same optim.name and optim.no_decay, or start a new run with run.init_from={ckpt}"
        )
    load_optimizer_state(optimizer, state["optimizer"], source=str(ckpt))
    progress.update(state["progress"])
    guard.load_state_dict(state["guard"])
    if state["rank"] is not None:
        loader.load_state_dict(state["rank"]["loader"])
        set_rng_state(state["rank"]["rng"], fabric.device)
    elif fabric.is_main:
        print(f"warning: {ckpt} has no state for rank {fabric.rank}; its data order restarts", file=sys.stderr)


# -- the run --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides)
    if args.compile_sweep:  # -- xla: compile sweep (recpre/xla.py)
        sweep = xla_helpers.sweep_overrides(str(settings.run.out_dir), int(settings.eval.interval))
        settings = load_settings(args.config, [*args.overrides, *sweep])
    if args.print_config:
        print(settings_to_yaml(settings), end="")
        return 0
    fabric = SimpleFabric(settings.fabric)
    validate_for_world(settings, fabric.world_size)
    fabric.launch()
    ck = settings.checkpoint
    stop = StopRequest.from_environment(ck.save_before_end_min, on_signal=ck.on_signal)
    try:
        return train(settings, fabric, stop, compile_sweep=args.compile_sweep)
    except (TrainingAborted, FabricError, CheckpointSaveError) as err:
        # Not bad input (exit code 2) but a run that cannot go on: one line, exit code 1, no stack dump.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.uninstall()
        fabric.teardown()


def train(settings: Any, fabric: SimpleFabric, stop: StopRequest, compile_sweep: bool = False) -> int:
    t_start = time.perf_counter()
    tr, sch, seed = settings.train, settings.schedule, settings.run.seed
    run_dir = Path(settings.run.out_dir)

    # Model shape and data sources.
    config = model_config(settings)
    data = prepare_data(settings, config, fabric)
    if data.vocab_size is not None and data.vocab_size > config.padded_vocab_size:
        raise UserError(
            f"the tokenizer of the {data.source} has {data.vocab_size} tokens but the model only "
            f"{config.padded_vocab_size}; set model.overrides.vocab_size={data.vocab_size}"
        )
    loader = make_loader(settings, config, fabric, data)
    val_batches = []
    if settings.eval.interval > 0 and data.val:
        val_batches = first_batches(
            make_loader(settings, config, fabric, data, val=True), settings.eval.max_batches // fabric.world_size
        )
    eos_id = data.eos_id if data.eos_id is not None else loader.eos_id  # tokenizer, model config or parquet
    if eos_id is None and (settings.data.document_mask or settings.data.reset_position_ids):
        raise UserError(
            "data.document_mask / data.reset_position_ids need the EOS token id, which neither the data files nor "
            "the model config give; set data.tokenizer to the tokenizer folder"
        )
    inputs = {
        "eos_id": eos_id,
        "document_mask": settings.data.document_mask,
        "reset_position_ids": settings.data.reset_position_ids,
    }

    # Model and optimizer: weights are identical on every rank (same seed; the fabric also broadcasts).
    fabric.seed_everything(seed)
    model = build_model(config, device="cpu")
    ckpt = agree_on_checkpoint(settings, run_dir, config, fabric)
    if ckpt is None and settings.run.init_from:
        load_weights(model, settings.run.init_from, config=config.to_dict())
    model = fabric.setup_model(model)
    optimizer = build_optimizer(fabric.unwrap(model), settings.optim)
    plan = BatchPlan(
        tr.world_batch_size,
        tr.micro_batch_size,
        fabric.world_size,
        config.block_size,
        sch.batch_size_ramp,
        sch.ramp_start_batch_size,
    )
    total_steps = plan.total_steps(tr.max_steps, tr.max_tokens)
    guard = LossSpikeGuard(tr.loss_spike_factor, tr.loss_spike_patience)
    progress = {"step": 0, "tokens": 0, "micro_steps": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    fabric.seed_everything(seed, per_rank=True)  # the training stream (random recurrent state init)

    if ckpt is not None:
        restore(ckpt, settings, fabric, model, optimizer, progress, guard, loader)
    if fabric.strategy == "xla":  # -- xla: optimizer state and weights in steady-state form (recpre/xla.py)
        xla_helpers.prepare_training(optimizer, [p for p in model.parameters() if p.requires_grad])
        fabric.unwrap(model).set_recurrence_boundary(xla_helpers.cut)  # one graph per no-grad iteration, any n
    if settings.model.compile:
        compile_blocks(fabric.unwrap(model))  # per block: one graph whatever the sampled depth

    # Everything is valid: only now does the run folder appear.
    if fabric.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_settings(settings, run_dir / "settings.yaml")
    fabric.barrier()
    step, tokens = progress["step"], progress["tokens"]
    # The token budget left is spent under this plan, whatever batch size the resumed part ran with.
    total_steps = plan.total_steps(tr.max_steps, tr.max_tokens, start_step=step, start_tokens=tokens)
    monitor = Monitor(
        run_dir,
        log_settings=settings.log,
        total_steps=total_steps,
        start_step=step,
        enabled=fabric.is_main,
        run_name=settings.run.name,
        config={"settings": settings_to_yaml(settings)},
    )
    device_name, peak = device_peak(fabric.device)
    depths = eval_depths(config, settings.eval.depths)
    monitor.print(
        f"run {settings.run.name} -> {run_dir} | model {config.name} {config.num_params() / 1e6:.2f}M params | "
        f"{fabric.world_size} x {device_name} ({fabric.precision}) | data: {data.source} | "
        f"{total_steps} steps x {plan.world_batch_size} seqs x {config.block_size} tokens"
        + (f" | resumed from {ckpt.name}" if ckpt is not None else "")
        + f" | setup {time.perf_counter() - t_start:.1f}s"
    )

    ckpt_root = run_dir / CHECKPOINTS_DIR
    on_xla = fabric.strategy == "xla"
    settings_yaml = settings_to_yaml(settings)
    last_saved = step if ckpt is not None else -1

    def save() -> Path | None:
        nonlocal last_saved
        if compile_sweep:  # -- xla: a compile sweep's weights are garbage under neuron_parallel_compile
            return None
        progress.update(step=step, tokens=tokens)
        path = save_checkpoint(
            ckpt_root,
            step,
            model=xla_helpers.cpu_module(model, build_model(config, device="meta")) if on_xla else model,
            model_config=config.to_dict(),
            settings_yaml=settings_yaml,
            state={
                "optimizer": xla_helpers.to_cpu(optimizer.state_dict()),
                "optim": optimizer_identity(settings),
                "progress": dict(progress),
                "guard": guard.state_dict(),
            },
            rank_state={"loader": loader.state_dict(), "rng": rng_state(fabric.device)},
            fabric=fabric,
            keep=settings.checkpoint.keep,
        )
        last_saved = step
        monitor.event("checkpoint", step=step, path=str(path))
        return path

    def run_validation() -> None:
        if not val_batches:
            return
        row = validate(
            model,
            val_batches,
            depths=depths,
            mean_depth=getattr(config, "mean_recurrence", None),
            fabric=fabric,
            input_kwargs=inputs,
            seed=seed,
        )
        monitor.validation({"step": step, "tokens": tokens, **row})

    if step == 0:
        run_validation()

    nan_steps = debug_nan_steps()
    params = [p for p in model.parameters() if p.requires_grad]
    clip = tr.grad_clip if tr.grad_clip and tr.grad_clip > 0 else math.inf
    throughput = Throughput()
    batches = iter(loader)
    model.train()
    stopped = None
    save_due = False
    while step < total_steps:
        accum = plan.accumulation_steps_within(step, tr.max_tokens, tokens)
        if accum == 0:
            break
        lr = learning_rate(
            step,
            base_lr=settings.optim.lr,
            total_steps=total_steps,
            name=sch.name,
            warmup_steps=sch.warmup_steps,
            cooldown_steps=sch.cooldown_steps,
            min_lr=sch.min_lr,
        )
        set_learning_rate(optimizer, lr, settings.optim.lr)
        throughput.start()

        # One optimizer step: the loss is a sum over all target tokens of all micro-batches on all ranks,
        # divided by their global count (the fabric's normalizer accounts for its mean all-reduce).
        micro = [next(batches) for _ in range(accum)]
        normalizer = fabric.loss_normalizer(count_targets([labels for _, labels in micro]))
        loss_sum = torch.zeros((), device=fabric.device)
        flops = 0.0
        for i, (input_ids, labels) in enumerate(micro):
            n, k = sample_depth(config, progress["micro_steps"], fabric.rank, seed)
            if on_xla:  # -- xla: a fixed k (and the model's graph cuts) keep the compiled graphs few
                n, k = xla_helpers.training_depth(config, n, k)
                if compile_sweep:
                    n, k = xla_helpers.sweep_depth(progress["micro_steps"], k)
            progress["micro_steps"] += 1
            input_ids = input_ids.to(fabric.device, non_blocking=True)
            labels = labels.to(fabric.device, non_blocking=True)
            with fabric.no_sync(model, enabled=i < accum - 1):
                with fabric.autocast():
                    out = model(
                        input_ids,
                        labels,
                        num_steps=(n, k),
                        loss_normalizer=normalizer,
                        **model_inputs(input_ids, **inputs),
                    )
                out.loss.backward()
            loss_sum += out.loss.detach()
            flops += training_flops_per_token(config, n, k) * input_ids.numel()
        fabric.all_reduce_gradients(model)
        if step + 1 in nan_steps:
            poison_gradients(model)
        if on_xla:  # -- xla: clip and skip a non-finite step on the device; read the values after the cut
            grad_norm_t = xla_helpers.masked_optimizer_step(optimizer, params, clip)
            loss_t = fabric.all_reduce(loss_sum, op="mean")
            optimizer.zero_grad(set_to_none=True)
            fabric.sync()
            grad_norm, loss = float(grad_norm_t), float(loss_t)
            if not math.isfinite(grad_norm):
                xla_helpers.rewind_step_counters(optimizer, fabric.device)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            loss = float(fabric.all_reduce(loss_sum, op="mean"))

        # Skip a step whose gradients are not finite; abort after too many in a row.
        if math.isfinite(grad_norm):
            if not on_xla:
                optimizer.step()
            progress["nonfinite_in_a_row"] = 0
        else:
            progress["skipped_steps"] += 1
            progress["nonfinite_in_a_row"] += 1
        if not on_xla:  # the XLA branch above already cleared gradients and cut the graph
            optimizer.zero_grad(set_to_none=True)
            fabric.sync()
        step += 1
        step_tokens = accum * plan.unit_tokens
        tokens += step_tokens
        throughput.stop(step_tokens)

        tokens_per_s, seconds = throughput.rate()
        flops_per_s = flops * fabric.world_size / seconds if seconds > 0 else 0.0
        row = {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        row.update(tokens_per_s=tokens_per_s, flops_per_s=flops_per_s, accum=accum, depth=[n, k])
        if on_xla:
            row["xla_graphs"] = xla_helpers.compile_count()
        mfu_datasheet, mfu_measured = mfu(flops_per_s, peak, fabric.world_size)
        if mfu_datasheet is not None:
            row.update(mfu=mfu_datasheet, mfu_measured=mfu_measured)
        monitor.train(row, show=step % settings.log.interval == 0 or step == 1 or step == total_steps)
        if progress["nonfinite_in_a_row"]:
            monitor.event("skipped_step", step=step, grad_norm=grad_norm, skipped_steps=progress["skipped_steps"])
            monitor.print(f"step {step}: non-finite gradient norm, step skipped ({progress['skipped_steps']} so far)")
            if progress["nonfinite_in_a_row"] >= tr.max_nonfinite_steps:
                path = save()
                raise TrainingAborted(
                    f"{progress['nonfinite_in_a_row']} optimizer steps in a row had non-finite gradients "
                    f"(train.max_nonfinite_steps={tr.max_nonfinite_steps}); the weights are saved unchanged in {path}: "
                    "lower optim.lr or check the data before resuming"
                )
        if guard.update(loss):
            raise TrainingAborted(
                f"the loss stayed above train.loss_spike_factor={tr.loss_spike_factor} x its running mean "
                f"({guard.mean:.4f}) for {guard.patience} steps (now {loss:.4f} at step {step}); "
                f"nothing was saved after the spike: resume from {ckpt_root / 'latest'} with a lower optim.lr"
            )

        if settings.eval.interval > 0 and (step % settings.eval.interval == 0 or step == total_steps):
            run_validation()
        interval = settings.checkpoint.interval
        save_due = save_due or (interval > 0 and step % interval == 0)
        # No interval save while the loss is spiking: `latest` keeps the pre-spike weights the guard points to.
        if (save_due and not guard.in_a_row) or step == total_steps:
            save()
            save_due = False
        if fabric.any_rank(stop.should_save_and_exit()):
            # Every rank is here: agree on the strongest reason (time beats SIGTERM), so rank 0 requeues
            # when any rank saw the deadline, not only when rank 0 did.
            code = fabric.all_reduce(torch.tensor(stop_code(stop.reason), dtype=torch.int32), op="max")
            stopped = stop.agree(int(code)) or "stop requested"
            break

    if last_saved != step:
        save()
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "tokens": tokens,
        "skipped_steps": progress["skipped_steps"],
        "wall_s": round(elapsed, 1),
    }
    if monitor.first_val:
        summary["initial_val_loss"] = round(monitor.first_val["val_loss"], 4)
    if monitor.last_val:
        summary["final_val_loss"] = round(monitor.last_val["val_loss"], 4)
    if stopped is not None:
        monitor.event("stopped", step=step, tokens=tokens, reason=stopped)
        monitor.print(f"stopped at step {step} ({stopped}); checkpoint saved, resume with the same command")
        monitor.close(summary, plot=settings.log.plot)
        if fabric.is_main:
            stop.requeue()
        return 0
    monitor.event("finished", **summary)
    monitor.close(summary, plot=settings.log.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
