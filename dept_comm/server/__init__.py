"""dept_comm.server: a parameter server that runs DiLoCo-style rounds over any named tensors."""
