"""The registered lowerings, one module each (imported by :data:`diffq.deployment.lowering.LOWERINGS`)."""
