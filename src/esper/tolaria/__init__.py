"""Tolaria: the training orchestrator: the run loop that ties Kasmina, Urza, Oona and Tamiyo together."""
