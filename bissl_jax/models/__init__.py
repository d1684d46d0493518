"""Backbones and their model bundles: ResNet, ViT (+ LoRA), GPT."""
