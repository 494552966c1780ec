"""The settings schema: the dataclass tree every YAML key and override is checked against, and the names other
modules dispatch on. Keys are a stable interface: tests, docs and saved run folders use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "launch_configs" / "debug.yaml"

# Names other modules dispatch on; kept here so a typo fails at load, not an hour into a job.
OPTIMIZERS = ("adamw", "ellis-adam", "muon")
SCHEDULES = ("trapezoid", "cosine", "linear", "constant")
# Static on purpose: flex/flash/nki register themselves only when their optional module is importable.
ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "flex", "flash", "nki")
STRATEGIES = ("auto", "single", "simple-ddp", "torch-ddp", "fsdp", "hsdp", "xla")
SHARD_GROUPS = ("node", "world")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
DEVICES = ("auto", "cpu", "cuda", "mps", "neuron", "xla")
PROGRESS = ("auto", "bar", "lines", "none")
WANDB_MODES = ("disabled", "offline", "online")
# ModelSettings keys that are also ModelConfig fields (runtime choices); passed through to ModelConfig.
RUNTIME_MODEL_KEYS = ("attention", "fused_head", "activation_checkpointing")


# --------------------------------------------------------------------------------------------------------------
# The dataclass tree. Keys are a stable interface: tests, docs and saved run folders use them.


@dataclass
class RunSettings:
    name: str = "run"  # run name; used in out_dir and as the wandb run name
    out_dir: str = "runs/${run.name}"  # run folder: settings.yaml, metrics.jsonl, checkpoints/
    seed: int = 1234  # seeds model init, data order and depth sampling
    resume: str = "auto"  # "auto" (latest checkpoint in out_dir if any) | "never" | a checkpoint path
    init_from: str | None = None  # weights-only start (e.g. an imported Huginn checkpoint); None = fresh init
    init_from_optional: bool = False  # true = a missing init_from path means a fresh init (said in a note)


@dataclass
class LoraSettings:
    rank: int = 0  # LoRA rank; 0 = no LoRA (the whole model trains); any fabric.strategy but xla. docs/lora.md
    alpha: float = 16.0  # scale of the adapter's update: alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["all"])  # STAGE[.attn|.mlp[.PROJ]], all, attn, mlp, injection
    per_iteration: int = 0  # m >= 2: the core's first m iterations get their own adapter (later ones the last)
    quantize: str | None = None  # "4bit": the frozen base in 4-bit NF4 (QLoRA; bitsandbytes, CUDA only; not fsdp/hsdp)


@dataclass
class ModelSettings:
    name: str = "debug-recurrent"  # a shape from recpre.model_registry
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the named shape
    attention: str = "auto"  # attention backend: auto | eager | sdpa | flex | flash | nki
    fused_head: str = "none"  # "chunked" = fused linear cross-entropy head (O(chunk x vocab) memory)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    lora: LoraSettings = field(default_factory=LoraSettings)  # low-rank adapters on a frozen base (rank > 0)


@dataclass
class DataSettings:
    train: list[str] = field(default_factory=list)  # parquet files/folders; empty = embedded default corpus
    val: list[str] = field(default_factory=list)  # validation parquet files/folders; empty = embedded/none
    weights: list[float] | None = None  # mixture weight per train source; None = proportional to size
    tokenizer: str | None = None  # folder with tokenizer.json; None = embedded corpus tokenizer
    document_mask: bool = False  # attention stays within each packed document
    reset_position_ids: bool = False  # positions restart at 0 at each document start
    prefetch: int = 2  # batches prepared ahead of the training step
    cache_dir: str | None = None  # where the embedded corpus is built/cached; None = the data module's default
    format: str = "packed"  # packed (tokenized parquet) | chat (conversations: JSONL/parquet rows of messages)
    chat_template: str = "plain"  # chat: a built-in template (plain | huginn) or a tokenizer_config.json/.jinja file


@dataclass
class OptimSettings:
    name: str = "adamw"  # adamw | ellis-adam | muon
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay (not applied to no_decay parameters)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias", "embedding"])  # name parts without decay
    update_clipping: bool = True  # ELLISAdam: divide the step by max(1, rms(g / sqrt(v)))
    muon_lr: float | None = None  # Muon matrices' learning rate; None = the optimizer's default


@dataclass
class ScheduleSettings:
    name: str = "trapezoid"  # trapezoid | cosine | linear | constant (all after a linear warmup)
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr
    cooldown_steps: int = 0  # trapezoid: linear decay to min_lr over the last cooldown_steps
    min_lr: float = 0.0  # learning rate at the end of the schedule
    batch_size_ramp: int = 0  # steps over which the world batch grows linearly; 0 = off
    ramp_start_batch_size: int = 0  # world batch (sequences) at step 0 of the ramp; 0 = one micro-batch per rank


@dataclass
class CurriculumSettings:
    name: str = "constant"  # constant | linear | sqrt: how mean depth and backprop depth ramp to their targets
    steps: int = 0  # optimizer steps of the ramp
    start_mean: int | None = None  # mean recurrence at step 0; None = the target (no ramp of the mean)
    start_backprop_depth: int | None = None  # backprop depth at step 0; None = the target


@dataclass
class RecurrenceSettings:
    mean: int | None = None  # mean recurrence sampled in training; None = the shape's mean_recurrence
    backprop_depth: int | None = None  # iterations with gradient; None = the shape's mean_backprop_depth
    sampling: str | None = None  # poisson-lognormal-filling | poisson-fill | fixed | non-recurrent; None = shape's
    lockstep: bool | None = None  # one depth per optimizer step (True) or per micro-batch; None = shape's
    state_noise: str = "per-batch"  # per-batch (world-size invariant) | rank-replicated (the reference's)
    curriculum: CurriculumSettings = field(default_factory=CurriculumSettings)


@dataclass
class TrainSettings:
    max_steps: int | None = None  # optimizer steps; at least one of max_steps / max_tokens must be set
    max_tokens: int | None = None  # token budget; steps = max_tokens // (world_batch_size * block_size)
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    world_batch_size: int = 32  # sequences per optimizer step over all ranks (accumulation is derived)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    max_nonfinite_steps: int = 10  # abort after this many skipped (non-finite gradient) steps in a row
    loss_spike_factor: float | None = 4.0  # stop when loss > factor x its running mean ...; None = off
    loss_spike_patience: int = 20  # ... for this many steps in a row
    recurrence: RecurrenceSettings = field(default_factory=RecurrenceSettings)  # depths trained at
    loss_on: str = "assistant"  # chat data: assistant (only assistant turns are targets) | all
    objective: str = "pretrain"  # pretrain (next-token loss; SFT with data.format chat) | grpo (the rl section)


@dataclass
class FabricSettings:
    strategy: str = "auto"  # auto | single | simple-ddp | torch-ddp | fsdp | hsdp | xla
    precision: str = "fp32"  # fp32 | bf16-mixed | bf16-true
    device: str = "auto"  # auto | cpu | cuda | mps | neuron (native TorchNeuron, trn2/trn3) | xla (trn1)
    chunk_mb: float = 25.0  # gradient all-reduce bucket size in MiB
    timeout_s: int = 1800  # process-group timeout in seconds
    optimizer_sharding: bool = False  # simple-ddp: each rank keeps the optimizer state of 1/N of the weights
    shard_group: str = "node"  # optimizer_sharding over the ranks of a node | the whole world
    shard_size: int | None = None  # hsdp: ranks per shard group (replicated across groups); None = a node
    offload: bool = False  # fsdp/hsdp on GPUs: parameters and optimizer state live in CPU memory


@dataclass
class WandbSettings:
    mode: str = "disabled"  # disabled | offline | online (online needs network on every rank-0 host)
    project: str = "recpre"
    entity: str | None = None  # wandb team/user; None = your default entity


@dataclass
class LogSettings:
    interval: int = 10  # optimizer steps between console lines; metrics.jsonl and wandb get a row every step
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none
    plot: bool = True  # write loss.png in the run folder
    wandb: WandbSettings = field(default_factory=WandbSettings)


@dataclass
class EvalSettings:
    interval: int = 100  # optimizer steps between validations; 0 = off
    depths: list[int] = field(default_factory=lambda: [1, 4, 8])  # recurrence depths (the driver adds the mean)
    max_batches: int = 8  # validation micro-batches per depth, over all ranks (the same rows at any world size)
    micro_batch_size: int | None = None  # None = train.micro_batch_size


@dataclass
class CheckpointSettings:
    interval: int = 1000  # optimizer steps between checkpoints; 0 = only at the end / on signal
    keep: int = 2  # keep the last K checkpoints
    save_before_end_min: float = 10.0  # save this many minutes before the SLURM time limit; 0 = off
    on_signal: bool = True  # save on SIGUSR1/SIGUSR2/SIGTERM before exiting
    # key `checkpoint.async` (a Python keyword, so the field has a trailing underscore): the loop stalls only to
    # copy the state to CPU memory; a background thread writes it (docs/checkpoints.md)
    async_: bool = False


@dataclass
class RLSettings:
    """train.objective grpo (recpre/rl/, docs/grpo.md); batch sizes count prompts, each sampled group_size times."""

    prompts: str | None = None  # JSONL rows with `prompt` or `messages` (+ fields the reward reads); None = bundled
    eval_prompts: str | None = None  # held-out JSONL for pass@1; None = the bundled task's held-out prompts
    eval_max_prompts: int = 64  # held-out prompts per evaluation (the first N)
    group_size: int = 8  # completions sampled per prompt
    max_new_tokens: int = 32  # completion length limit
    stop: list[str] = field(default_factory=list)  # a completion also ends once its text contains one of these
    temperature: float = 1.0  # sampling temperature of rollouts (log-probabilities use the same)
    top_p: float = 1.0  # nucleus sampling of rollouts
    kl_coef: float = 0.04  # weight of the k3 KL to the frozen initial weights; 0 = no reference model
    clip_eps: float = 0.2  # PPO clip range of the ratio to the rollout policy
    updates_per_rollout: int = 1  # optimizer steps over each rollout (ratios move from 1 after the first)
    scale_rewards: bool = True  # divide advantages by the group's reward std (false = Dr. GRPO)
    reward: str = "first-parameter"  # a built-in reward or `module:function` (prompt, completion, example) -> float
    depth: str = "fixed"  # recurrent models: fixed (depth_value) | sampled (as train.recurrence samples)
    depth_value: int | None = None  # fixed rollout depth; None = the mean of train.recurrence
    eval_depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16])  # reward_by_depth at these depths
    eval_adaptive: bool = False  # also evaluate with adaptive exit (generation's AdaptiveDepth defaults)
    eval_samples: int = 0  # > 0: also sampled_pass_at_1, the mean success of this many samples per prompt


@dataclass
class Settings:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    fabric: FabricSettings = field(default_factory=FabricSettings)
    log: LogSettings = field(default_factory=LogSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    rl: RLSettings = field(default_factory=RLSettings)
