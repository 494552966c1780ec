"""Evaluation: the lm-eval model class ("recpre"), bundled offline tasks, depth sweeps and their plots.

`recpre.eval.harness` imports lm-eval (the `eval` extra); import it only where lm-eval is needed.
"""
