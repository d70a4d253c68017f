"""zhtune: make a LLaMA-family model good at Chinese and ship it (run `zhtune --help`)."""

__version__ = "0.1.0"
