"""A parameter server: scheduler and servers (numpy only; never imports torch)."""
