"""dept_comm.participant: the client side, wrapping a user's model and inner optimizer."""
