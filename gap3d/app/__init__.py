"""``gap3d app``: a local web UI to try prompts (``backend`` does the work, ``ui`` the page)."""
