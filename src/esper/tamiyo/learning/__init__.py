"""Tamiyo's offline policy learning: growth episodes on small tasks, rollouts, and the PPO and A2C
trainers that improve the GNN policy (``python -m esper.tamiyo.learning.policy_training``).

The runtime controller (:mod:`esper.tamiyo.controller`) never imports this package.
"""
