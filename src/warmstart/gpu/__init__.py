"""The host side of CUDA: the driver's checkpoint API, the CUDA processes of a tree, and GPU placement."""
