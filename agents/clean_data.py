"""Baselines that use the clean split directly instead of teaching with it.

Every learned teacher reads a clean validation split; these baselines show what simply *training
on* those clean labels buys, so that a teacher is only credited for beating them. Each trains the
same student for the same number of updates as the teachers, with uniform weights, on another data
pool of the same env (``Teaching-v0``'s ``train_pool``); the clean split stays the validation data.
"""

from __future__ import annotations

from agents.heuristics import UniformTeacher


class CleanOnly(UniformTeacher):
    """Train on the clean split alone (its labels are all correct, but it is small)."""

    name = "clean_only"
    env_overrides = {"train_pool": "clean"}


class UniformPlusClean(UniformTeacher):
    """Uniform weights on the noisy training split and the clean split together."""

    name = "uniform_plus_clean"
    env_overrides = {"train_pool": "noisy+clean"}


class Finetune(UniformTeacher):
    """Uniform training on the noisy split, then the last 20% of the updates on the clean split."""

    name = "finetune"
    env_overrides = {"train_pool": "finetune", "finetune_fraction": 0.2}
