"""Cost planning: `gap3d bench` measures this machine, `gap3d plan` estimates a run."""
