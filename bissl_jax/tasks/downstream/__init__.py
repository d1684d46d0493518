"""Downstream tasks L_D: image classification and text classification."""
