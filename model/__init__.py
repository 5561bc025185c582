"""mixmalmm.model."""
