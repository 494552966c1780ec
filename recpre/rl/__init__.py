"""Reinforcement learning with verifiable rewards (GRPO) as an objective of the training driver.

objective.py holds the math (advantages, clipped ratio, KL), rewards.py the reward functions, tasks.py the
bundled task, prompts.py where prompts come from, rollout.py sampling completions, step.py the optimizer step
and evaluation.py held-out pass@1 and reward by depth; driver.py assembles them for train.py.
"""
