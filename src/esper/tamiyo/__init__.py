"""Tamiyo: the controller that decides where and when to grow, and learns to do it better."""
