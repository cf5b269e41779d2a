"""The network-namespace lab (``netns``: pods, sidecars, clean-up) and the demo built on it."""
