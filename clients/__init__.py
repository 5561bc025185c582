"""mixmalmm.clients."""
