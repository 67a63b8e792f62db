//! Activation offload for "unsloth" gradient checkpointing: pinned host pool + scheduler.
