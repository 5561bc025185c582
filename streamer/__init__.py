"""mixmalmm.streamer."""
