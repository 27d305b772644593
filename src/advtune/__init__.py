"""advtune: find the CNN components adversarial attacks exploit and fine-tune only those."""
__version__ = "0.1.0"
