"""Tasks: what a run trains on — datasets (train/validation/test splits), host models, and the
loss and evaluation that go with them.

Shared by Tolaria's run loop and Tamiyo's policy learning, so neither has to import the other.
"""
