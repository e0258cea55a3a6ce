"""Evaluation on frozen features, shared by the training callbacks and eval.py."""
