"""GRPO's parts for the driver (train.py): prompts instead of packed rows, the rollout RNG as a per-rank
checkpoint part, and, once the trainer exists, the step function and the held-out evaluator.

Everything a user can get wrong (the prompts files, a prompt too long for the context, the reward's name) is
checked here, before the run folder exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recpre.data.chat import special_tokens
from recpre.data.chat_template import load_chat_template
from recpre.errors import UserError
from recpre.monitor import read_metrics
from recpre.rl.evaluation import PLOT_FILE, HeldOut, evaluation_row, plot_reward_by_depth
from recpre.rl.prompts import PromptLoader, prompt_text, read_prompt_rows
from recpre.rl.rewards import RewardFn, resolve_reward, score
from recpre.rl.rollout import RolloutRng
from recpre.rl.step import GrpoObjective
from recpre.train_state import TrainState


def load_tokenizer_for(settings: Any, config: Any, fabric: Any) -> Any:
    """data.tokenizer, or the embedded corpus's (built once, rank 0 first)."""
    if settings.data.tokenizer:
        from recpre.data.tokenizer import load_tokenizer

        return load_tokenizer(settings.data.tokenizer)
    from recpre.data.corpus import prepare_embedded_corpus

    if not fabric.is_main:
        fabric.barrier()
    corpus = prepare_embedded_corpus(config.block_size, cache_dir=settings.data.cache_dir)
    if fabric.is_main:
        fabric.barrier()
    return corpus.tokenizer()


def encode_prompts(rows: list[dict], tokenizer: Any, settings: Any, config: Any, key: str) -> tuple[list, list]:
    """(texts, token ids) of prompt rows; a prompt that leaves no room for max_new_tokens is refused."""
    template = load_chat_template(settings.data.chat_template)
    special = special_tokens(tokenizer)
    texts = [prompt_text(row, template, special) for row in rows]
    ids = [tokenizer.encode(text) for text in texts]
    room = config.block_size - settings.rl.max_new_tokens
    for i, row_ids in enumerate(ids):
        if not row_ids or len(row_ids) > room:
            raise UserError(
                f"prompt {i + 1} of {key} has {len(row_ids)} tokens, but the context ({config.block_size}) minus "
                f"rl.max_new_tokens ({settings.rl.max_new_tokens}) leaves {room}; shorten it or lower rl.max_new_tokens"
            )
    return texts, ids


def prompt_rows(rl: Any) -> tuple[list[dict], list[dict], str]:
    """(training rows, held-out rows, a name for the source)."""
    if rl.prompts:
        train = read_prompt_rows(rl.prompts, "rl.prompts")
        held_out = read_prompt_rows(rl.eval_prompts, "rl.eval_prompts") if rl.eval_prompts else []
        return train, held_out, f"rl.prompts ({len(train)} prompts)"
    from recpre.rl.tasks import first_parameter_rows

    train, held_out = first_parameter_rows()
    if rl.eval_prompts:
        held_out = read_prompt_rows(rl.eval_prompts, "rl.eval_prompts")
    return train, held_out, f"bundled first-parameter task ({len(train)} prompts, {len(held_out)} held out)"


@dataclass
class GrpoSetup:
    """What GRPO brings to `build_run` before the model exists."""

    loader: PromptLoader
    held_out: HeldOut
    tokenizer: Any
    reward_fn: RewardFn
    rng: RolloutRng
    source: str

    @property
    def parts(self) -> dict[str, Any]:
        """Per-rank checkpoint parts beyond the driver's."""
        return {"rollout_rng": self.rng}

    def attach(self, trainer: Any, settings: Any, run_dir: Path) -> tuple[Any, Any]:
        """(step function, evaluator) for the trainer the driver built."""
        rl = settings.rl
        reference = reference_model(settings, trainer) if rl.kl_coef > 0 else None
        objective = GrpoObjective(rl, reference, self.reward_fn, self.tokenizer, self.rng, rl.depth_value)
        evaluate = self.held_out.rows and settings.eval.interval > 0
        evaluator = GrpoEvaluator(objective, self.held_out, settings, run_dir) if evaluate else None
        return objective.step, evaluator


def prepare_grpo(settings: Any, config: Any, fabric: Any) -> GrpoSetup:
    """Prompts (encoded and checked), the reward and the rollout RNG; nothing is written."""
    rl = settings.rl
    tokenizer = load_tokenizer_for(settings, config, fabric)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.padded_vocab_size}; "
            f"set model.overrides.vocab_size={tokenizer.vocab_size}"
        )
    reward_fn = resolve_reward(rl.reward)
    train, held_out, source = prompt_rows(rl)
    texts, ids = encode_prompts(train, tokenizer, settings, config, "rl.prompts")
    score(reward_fn, texts[0], "", train[0])  # a reward that cannot run fails here, before the run folder exists
    held_out = held_out[: rl.eval_max_prompts]
    eval_texts, eval_ids = encode_prompts(held_out, tokenizer, settings, config, "rl.eval_prompts")
    loader = PromptLoader(train, texts, ids, micro_batch_size=settings.train.micro_batch_size, rank=fabric.rank,
                          world_size=fabric.world_size, seed=settings.run.seed)  # fmt: skip
    rng = RolloutRng(settings.run.seed, fabric.rank)
    return GrpoSetup(loader, HeldOut(held_out, eval_texts, eval_ids), tokenizer, reward_fn, rng, source)


def reference_model(settings: Any, trainer: Any) -> torch.nn.Module:
    """The frozen initial weights (run.init_from, or the run's seeded fresh init), whatever step a resumed run
    is at."""
    from recpre.model import build_model
    from recpre.weights import load_initial_weights

    config = trainer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.run.seed)  # the fresh init the driver draws (fabric.seed_everything)
        reference = build_model(config)
    if settings.run.init_from:
        load_initial_weights(reference, settings.run.init_from, config=config.to_dict())
    reference.requires_grad_(False)
    return reference.to(trainer.fabric.device).eval()


class GrpoEvaluator:
    """Held-out pass@1 and reward by depth every eval.interval (and at steps 0 and the last), with its plot."""

    def __init__(self, objective: GrpoObjective, held_out: HeldOut, settings: Any, run_dir: Path) -> None:
        self.objective, self.held_out, self.settings, self.run_dir = objective, held_out, settings, run_dir

    def __call__(self, trainer: Any, state: TrainState, monitor: Any) -> dict[str, float]:
        rl = self.settings.rl
        recurrent = trainer.recurrence is not None
        depth = (rl.depth_value or trainer.recurrence.mean) if recurrent else None
        row = evaluation_row(
            trainer.fabric.unwrap(trainer.model), self.held_out, fabric=trainer.fabric, rl=rl,
            tokenizer=self.objective.tokenizer, reward_fn=self.objective.reward_fn, seed=self.settings.run.seed,
            rollout_depth=depth, recurrent=recurrent,
        )  # fmt: skip
        monitor.event("evaluation", step=state.step, held_out=len(self.held_out.rows), **row)
        sampled = row.get("sampled_pass_at_1")
        by_depth = " ".join(f"{k.rsplit('_', 1)[-1]}:{v:.3f}" for k, v in row.items() if k.startswith("reward_"))
        monitor.print(f"evaluation step {state.step} | held-out pass@1 {row['pass_at_1']:.3f}"
                      + (f" | sampled {sampled:.3f}" if sampled is not None else "")
                      + (f" | reward by depth {by_depth}" if by_depth else ""))  # fmt: skip
        if trainer.fabric.is_main and self.settings.log.plot and (self.run_dir / "metrics.jsonl").is_file():
            rows = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r.get("event") == "evaluation"]
            plot_reward_by_depth(rows, self.run_dir / PLOT_FILE)
        return row
