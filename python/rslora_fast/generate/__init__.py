"""Fast generation after training and inside RL loops (the decode path).

A room of its own: training code never imports from here. ``matvec`` holds the projections of a
decode step (4-bit weights read without materializing them in 16-bit, LoRA unmerged); ``engine``
holds the static KV cache and the captured per-token step; the ``generate`` loop turns HF's
``generate`` keywords into engine calls.
"""
