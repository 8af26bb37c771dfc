"""Peer model servers for bench/serve_compare.py: LitServe and KServe serving the same kernels.conv2d."""
