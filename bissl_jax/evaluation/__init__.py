"""Evaluation: metrics, few-shot and linear-probe protocols, feature visualisation,
training-curve plots."""
