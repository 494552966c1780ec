"""Submitting runs to clusters: profiles (data), batch scripts, executors, evaluation job arrays.

`launchers/submit.py` is the command line over this package; `recpre/preemption.py` is the
training-side half (save before the time limit, requeue).
"""
