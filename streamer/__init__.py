"""mixmalmm.streamer: sources, ActionShot, preprocessing, the engine, its ZeroMQ server and the CLI."""

import mixmalmm.kernels  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
