"""conv-as-a-service: our own Conv2d forward and backward over HTTP, with parity against torch.nn.Conv2d."""

__version__ = "0.1.0"
