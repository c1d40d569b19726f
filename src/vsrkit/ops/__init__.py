"""Low-level operators: flow warping and deformable convolution."""
