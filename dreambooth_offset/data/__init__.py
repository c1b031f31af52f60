"""Where training images and captions come from: concept folders (ours, kohya's `N_name`), and the
caption options applied to them at each step."""
