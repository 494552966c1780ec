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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recpre import xla as xla_helpers
from recpre.async_checkpoint import wait_for_saves
from recpre.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointSaveError,
    check_resumable,
    check_same_shape,
    find_latest,
    refuse_to_overwrite,
    resolve_checkpoint,
)
from recpre.data.chat_sources import prepare_chat_data
from recpre.errors import UserError, run_cli
from recpre.fabric import FabricError, SimpleFabric
from recpre.flops import device_peak, mfu
from recpre.guardrails import LossSpikeGuard, TrainingAborted, debug_nan_steps
from recpre.lora import attach_lora, lora_init_parameter
from recpre.memory import memory_line
from recpre.memory_plan import check_device_memory, plan_command
from recpre.model import build_model, compile_blocks
from recpre.monitor import Monitor, Throughput, require_logging_extras
from recpre.optim import build_optimizer
from recpre.preemption import StopRequest, stop_code
from recpre.recurrence import RecurrencePolicy
from recpre.rl.driver import prepare_grpo
from recpre.schedules import BatchPlan, learning_rate, set_learning_rate
from recpre.settings import (
    load_settings,
    model_config,
    save_settings,
    settings_notes,
    settings_to_dict,
    settings_to_yaml,
    validate_for_world,
)
from recpre.step_backends import step_backend
from recpre.train_state import OptimizerIdentity, RngState, RunState, TrainState
from recpre.train_step import Trainer, train_step
from recpre.validation import eval_depths, validate
from recpre.weights import load_initial_weights


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
    parser.add_argument("--plan", action="store_true", help="print what each rank will hold (recpre/memory_plan.py)")
    parser.add_argument("--world-size", type=int, default=None, help="--plan: the number of ranks")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="--plan: memory of one device")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="--plan: ranks per node (default: all)")
    parser.add_argument("--no-memory-check", action="store_true", help="skip the planner's check on a GPU")
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
    if d.format == "chat":  # conversations -> packed rows with context flags (recpre.data.chat)
        if not fabric.is_main:
            fabric.barrier()
        chat = prepare_chat_data(d, config.block_size)
        if fabric.is_main:
            fabric.barrier()
        return Data(chat.train, chat.val, chat.boundary_id, chat.vocab_size, chat.source)
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
        role="validation" if val else "train",
        loss_on=settings.train.loss_on,
    )


def first_batches(loader: Any, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` micro-batches of a loader (the fixed validation set)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= count:
            break
    return batches


def data_stream(settings: Any, config: Any, fabric: SimpleFabric, data: Data) -> tuple[Any, list, dict[str, Any]]:
    """(training loader, fixed validation batches, the model's extra inputs), after checking that the data
    fits the model (vocabulary) and gives what document masking needs (the EOS id)."""
    if data.vocab_size is not None and data.vocab_size > config.padded_vocab_size:
        raise UserError(
            f"the tokenizer of the {data.source} has {data.vocab_size} tokens but the model only "
            f"{config.padded_vocab_size}; set model.overrides.vocab_size={data.vocab_size}"
        )
    loader = make_loader(settings, config, fabric, data)
    val_batches = []
    if settings.eval.interval > 0 and data.val:
        val_loader = make_loader(settings, config, fabric, data, val=True)
        val_batches = first_batches(val_loader, settings.eval.max_batches // fabric.world_size)
    eos_id = data.eos_id if data.eos_id is not None else loader.eos_id  # tokenizer, model config or parquet
    d = settings.data
    if eos_id is None and (d.document_mask or d.reset_position_ids):
        raise UserError(
            "data.document_mask / data.reset_position_ids need the EOS token id, which neither the data files nor "
            "the model config give; set data.tokenizer to the tokenizer folder"
        )
    return (
        loader,
        val_batches,
        {"eos_id": eos_id, "document_mask": d.document_mask, "reset_position_ids": d.reset_position_ids},
    )


# -- resume ---------------------------------------------------------------------------------------------


def find_resume(settings: Any, run_dir: Path, config: Any) -> Path | None:
    """The checkpoint this run continues from (run.resume: auto | never | a path), shape-checked."""
    resume = str(settings.run.resume)
    root = run_dir / CHECKPOINTS_DIR
    if resume == "never":
        refuse_to_overwrite(run_dir, resume)
        return None
    ckpt = find_latest(root) if resume == "auto" else resolve_checkpoint(resume)
    if ckpt is None:  # nothing verifies: a folder holding an earlier attempt's checkpoints is never restarted
        refuse_to_overwrite(run_dir, resume)
        return None
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


# -- the run --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides, mark_unset_env=args.print_config)
    sweep_depths = None
    if args.compile_sweep:  # XLA: a few steps that visit every graph (recpre/xla.py)
        sweep_depths = backprop_depths(settings)
        sweep = xla_helpers.sweep_overrides(str(settings.run.out_dir), int(settings.eval.interval), len(sweep_depths))
        settings = load_settings(args.config, [*args.overrides, *sweep])
    if args.print_config:
        for note in settings_notes(settings):  # e.g. an unset ${oc.env:VAR}, shown marked
            print(note, file=sys.stderr)
        print(settings_to_yaml(settings), end="")
        return 0
    if args.plan:
        return plan_command(settings, args.world_size, args.device_memory_gib, args.ranks_per_node)
    require_logging_extras(settings.log)  # before any run folder exists
    fabric = SimpleFabric(settings.fabric)
    validate_for_world(settings, fabric.world_size)
    if not args.no_memory_check:
        check_device_memory(settings, fabric)  # on a GPU: refuse a run the memory plan says will not fit
    fabric.launch()
    ck = settings.checkpoint
    stop = StopRequest.from_environment(ck.save_before_end_min, on_signal=ck.on_signal)
    try:
        return train(settings, fabric, stop, sweep_depths=sweep_depths)
    except (TrainingAborted, FabricError, CheckpointSaveError) as err:
        # Not bad input (exit code 2) but a run that cannot go on: one line, exit code 1, no stack dump.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.uninstall()
        wait_for_saves()  # checkpoint.async: a save in flight completes before the process group closes
        fabric.teardown()


def backprop_depths(settings: Any) -> list[int]:
    """Every backprop depth the run trains at (a curriculum may ramp it): each is one set of XLA graphs."""
    config = model_config(settings)
    policy = RecurrencePolicy.from_settings(settings.train.recurrence, config)
    steps = settings.train.max_steps or settings.train.recurrence.curriculum.steps + 1
    return policy.backprop_depths(steps) if policy is not None else [1]


@dataclass
class Run:
    """A run, assembled: its settings, the parts a step touches, its state and where it reports."""

    settings: Any
    fabric: SimpleFabric
    config: Any
    trainer: Trainer
    state: TrainState
    parts: RunState  # everything a checkpoint holds
    loader: Any
    val_batches: list
    plan: BatchPlan
    total_steps: int
    monitor: Monitor
    started: float
    last_saved: int = -1
    step_fn: Any = train_step  # the objective's step: train_step, or GRPO's (recpre/rl/step.py)
    evaluator: Any = None  # an objective's own evaluation instead of the validation loss (GRPO: pass@1)

    def learning_rate(self) -> float:
        sch = self.settings.schedule
        return learning_rate(
            self.state.step,
            base_lr=self.settings.optim.lr,
            total_steps=self.total_steps,
            name=sch.name,
            warmup_steps=sch.warmup_steps,
            cooldown_steps=sch.cooldown_steps,
            min_lr=sch.min_lr,
        )

    def validate(self) -> None:
        if self.evaluator is not None:
            self.evaluator(self.trainer, self.state, self.monitor)
            return
        if not self.val_batches:
            return
        row = validate(
            self.trainer.model,
            self.val_batches,
            depths=eval_depths(self.config, self.settings.eval.depths),
            mean_depth=getattr(self.config, "mean_recurrence", None),
            fabric=self.fabric,
            input_kwargs=self.trainer.input_kwargs,
            seed=self.settings.run.seed,
        )
        self.monitor.validation({"step": self.state.step, "tokens": self.state.tokens, **row})

    def save(self) -> Path | None:
        if not self.trainer.backend.saves_checkpoints:
            return None
        # checkpoint.async returns once the state is staged; the event is logged once the folder is complete
        path = self.parts.save(
            self.state.step, on_saved=lambda s, p: self.monitor.event("checkpoint", step=s, path=str(p))
        )
        self.last_saved = self.state.step
        return path


def build_run(settings: Any, fabric: SimpleFabric, sweep_depths: list[int] | None = None) -> Run:
    """Data, model, optimizer and state (resumed when a checkpoint exists); the run folder appears only once
    all of it is valid, so bad input leaves nothing behind."""
    t_start, seed, run_dir = time.perf_counter(), settings.run.seed, Path(settings.run.out_dir)
    config = model_config(settings)
    grpo = prepare_grpo(settings, config, fabric) if settings.train.objective == "grpo" else None
    if grpo is not None:  # prompts instead of packed rows (recpre/rl/driver.py)
        loader, val_batches, inputs, source = grpo.loader, [], {}, grpo.source
    else:
        data = prepare_data(settings, config, fabric)
        loader, val_batches, inputs = data_stream(settings, config, fabric, data)
        source = data.source

    fabric.seed_everything(seed)  # weights are identical on every rank (the fabric also broadcasts them)
    model = build_model(config, device="meta" if fabric.builds_on_meta else "cpu")
    ckpt = agree_on_checkpoint(settings, run_dir, config, fabric)
    # A LoRA run's checkpoints hold adapters only: its base comes from run.init_from on every start.
    init_from = settings.run.init_from if ckpt is None or settings.model.lora.rank else None
    loaded = None  # the file run.init_from resolved to
    if init_from and not fabric.builds_on_meta:
        loaded = load_initial_weights(model, init_from, config=config.to_dict())
    adapters = attach_lora(model, settings, fabric, loaded)  # model.lora: docs/lora.md
    init = lora_init_parameter(model, seed) if adapters else None  # draws the adapters of a meta model too
    model = fabric.setup_model(model, init)  # sharded strategies materialise and initialise a meta model here
    if init_from and fabric.builds_on_meta:
        load_initial_weights(model, init_from, config=config.to_dict(), fabric=fabric)  # shard by shard
    optimizer = fabric.setup_optimizer(build_optimizer(fabric.unwrap(model), settings.optim))
    backend = step_backend(fabric.strategy, config, sweep_depths=sweep_depths)
    tr = settings.train
    state = TrainState(guard=LossSpikeGuard(tr.loss_spike_factor, tr.loss_spike_patience))
    parts = RunState(
        fabric, backend, model, optimizer, config.to_dict(), settings_to_yaml(settings), run_dir / CHECKPOINTS_DIR,
        settings.checkpoint.keep, shared={"optim": OptimizerIdentity(settings.optim), "progress": state},
        per_rank={"loader": loader, "rng": RngState(fabric.device), **(grpo.parts if grpo else {})},
        async_save=settings.checkpoint.async_, adapters=adapters,
    )  # fmt: skip
    fabric.seed_everything(seed, per_rank=True)
    if ckpt is not None and not parts.restore(ckpt):
        fabric.print(f"starting from the weights of {ckpt} (no optimizer state: an imported checkpoint)")
    backend.prepare(model, optimizer)
    if settings.model.compile:
        # per block: one graph whatever the sampled depth; the Neuron backend on the native device
        compile_blocks(fabric.unwrap(model), **fabric.compile_options())

    if fabric.is_main:  # everything is valid: only now does the run folder appear
        run_dir.mkdir(parents=True, exist_ok=True)
        save_settings(settings, run_dir / "settings.yaml")
    fabric.barrier()
    sch = settings.schedule
    plan = BatchPlan(tr.world_batch_size, tr.micro_batch_size, fabric.world_size, config.block_size,
                     sch.batch_size_ramp, sch.ramp_start_batch_size)  # fmt: skip
    # The token budget left is spent under this plan, whatever batch size the resumed part ran with.
    total_steps = plan.total_steps(tr.max_steps, tr.max_tokens, start_step=state.step, start_tokens=state.tokens)
    monitor = Monitor(run_dir, log_settings=settings.log, total_steps=total_steps, start_step=state.step,
                      enabled=fabric.is_main, run_name=settings.run.name,
                      config=settings_to_dict(settings))  # fmt: skip
    trainer = Trainer(model, optimizer, fabric, backend, config,
                      RecurrencePolicy.from_settings(tr.recurrence, config), seed,
                      grad_clip=tr.grad_clip or float("inf"), input_kwargs=inputs,
                      nan_steps=debug_nan_steps())  # fmt: skip
    run = Run(settings, fabric, config, trainer, state, parts, loader, val_batches, plan, total_steps, monitor, t_start)
    if grpo is not None:
        run.step_fn, run.evaluator = grpo.attach(trainer, settings, run_dir)
    run.last_saved = state.step if ckpt is not None else -1
    monitor.print(
        f"run {settings.run.name} -> {run_dir} | model {config.name} {config.num_params() / 1e6:.2f}M params | "
        f"{fabric.world_size} x {device_peak(fabric.device)[0]} ({fabric.precision}) | data: {source} | "
        f"{total_steps} steps x {plan.world_batch_size} seqs x {config.block_size} tokens"
        + (f" | resumed from {ckpt.name}" if ckpt is not None else "")
        + f" | setup {time.perf_counter() - t_start:.1f}s"
    )
    for note in settings_notes(settings):  # e.g. a schedule shortened to fit a short run
        monitor.print(note)
    return run


def train(settings: Any, fabric: SimpleFabric, stop: StopRequest, sweep_depths: list[int] | None = None) -> int:
    run = build_run(settings, fabric, sweep_depths)
    state, tr = run.state, settings.train
    if state.step == 0:
        run.validate()
    batches = iter(run.loader)
    run.trainer.model.train()
    throughput = Throughput()
    stopped, save_due = None, False
    while state.step < run.total_steps:
        accum = run.plan.accumulation_steps_within(state.step, tr.max_tokens, state.tokens)
        if accum == 0:
            break
        lr = run.learning_rate()
        set_learning_rate(run.trainer.optimizer, lr, settings.optim.lr)
        throughput.start()
        metrics = run.step_fn(run.trainer, state, [next(batches) for _ in range(accum)])
        throughput.stop(metrics["step_tokens"])
        log_step(run, metrics, lr, throughput)
        check_health(run, metrics["loss"], metrics["grad_norm"])

        if settings.eval.interval > 0 and (state.step % settings.eval.interval == 0 or state.step == run.total_steps):
            run.validate()
        interval = settings.checkpoint.interval
        save_due = save_due or (interval > 0 and state.step % interval == 0)
        # No interval save while the loss is spiking: `latest` keeps the pre-spike weights the guard points to.
        if (save_due and not state.guard.in_a_row) or state.step == run.total_steps:
            run.save()
            save_due = False
        if fabric.any_rank(stop.should_save_and_exit()):
            # Every rank is here: agree on the strongest reason (time beats SIGTERM), so rank 0 requeues
            # when any rank saw the deadline, not only when rank 0 did.
            code = fabric.all_reduce(torch.tensor(stop_code(stop.reason), dtype=torch.int32), op="max")
            stopped = stop.agree(int(code)) or "stop requested"
            break
    return finish(run, stop, stopped)


def log_step(run: Run, metrics: dict[str, Any], lr: float, throughput: Throughput) -> None:
    """One metrics row (and a console line every log.interval steps)."""
    step = run.state.step
    tokens_per_s, seconds = throughput.rate()
    flops_per_s = metrics["flops"] / seconds if seconds > 0 else 0.0
    row = {"step": step, "tokens": run.state.tokens, "loss": metrics["loss"], "lr": lr}
    row.update(grad_norm=metrics["grad_norm"], tokens_per_s=tokens_per_s, flops_per_s=flops_per_s)
    if metrics["memory"] is not None:  # what this rank holds, once, after the first optimizer step
        run.monitor.event("memory", step=step, **{k: v for k, v in metrics["memory"].items() if k != "event"})
        run.monitor.print(memory_line(metrics["memory"]))
    skip = ("loss", "grad_norm", "flops", "step_tokens", "memory")
    row.update({k: v for k, v in metrics.items() if k not in skip and v is not None})  # depth: recurrent only
    mfu_datasheet, mfu_measured = mfu(flops_per_s, device_peak(run.fabric.device)[1], run.fabric.world_size)
    if mfu_datasheet is not None:
        row.update(mfu=mfu_datasheet, mfu_measured=mfu_measured)
    show = step % run.settings.log.interval == 0 or step == 1 or step == run.total_steps
    run.monitor.train(row, show=show)


def check_health(run: Run, loss: float, grad_norm: float) -> None:
    """Count a skipped (non-finite) step; abort after too many in a row or when the loss stays spiked."""
    state, tr, monitor = run.state, run.settings.train, run.monitor
    if state.nonfinite_in_a_row:
        monitor.event("skipped_step", step=state.step, grad_norm=grad_norm, skipped_steps=state.skipped_steps)
        monitor.print(f"step {state.step}: non-finite gradient norm, step skipped ({state.skipped_steps} so far)")
        if state.nonfinite_in_a_row >= tr.max_nonfinite_steps:
            path = run.save()
            run.parts.wait()
            raise TrainingAborted(
                f"{state.nonfinite_in_a_row} optimizer steps in a row had non-finite gradients "
                f"(train.max_nonfinite_steps={tr.max_nonfinite_steps}); the weights are saved unchanged in {path}: "
                "lower optim.lr or check the data before resuming"
            )
    if state.guard.update(loss):
        raise TrainingAborted(
            f"the loss stayed above train.loss_spike_factor={tr.loss_spike_factor} x its running mean "
            f"({state.guard.mean:.4f}) for {state.guard.patience} steps (now {loss:.4f} at step {state.step}); "
            f"nothing was saved after the spike: resume from {run.parts.root / 'latest'} with a lower optim.lr"
        )


def finish(run: Run, stop: StopRequest, stopped: str | None) -> int:
    """Final checkpoint, summary of the whole run, and a requeue when a stop was requested."""
    state, monitor = run.state, run.monitor
    if run.last_saved != state.step:
        run.save()
    run.parts.wait()  # checkpoint.async: the last save is complete (or its error raised) before the run ends
    summary = {"steps": state.step, "tokens": state.tokens, "skipped_steps": state.skipped_steps}
    summary.update(wall_s=round(time.perf_counter() - run.started, 1), **monitor.run_validation_summary())
    if stopped is not None:
        monitor.event("stopped", step=state.step, tokens=state.tokens, reason=stopped)
        monitor.print(f"stopped at step {state.step} ({stopped}); checkpoint saved, resume with the same command")
        monitor.close(summary, plot=run.settings.log.plot)
        if run.fabric.is_main:
            stop.requeue()
        return 0
    monitor.event("finished", **summary)
    monitor.close(summary, plot=run.settings.log.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
