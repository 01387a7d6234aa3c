"""Optional speed-ups of the worker loop, kept apart from it so the loop reads plainly.

    prefetch   the next step's pull, sent before it is needed
    overlap    each shard's gradient pushed while backward still runs (--overlap)
"""
