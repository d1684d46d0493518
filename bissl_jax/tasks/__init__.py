"""Pretext tasks (the lower level's L_P), downstream tasks (the upper level's L_D), and
the on-device augmentations they share."""
