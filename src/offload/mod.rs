//! Activation offload for "unsloth" gradient checkpointing, and the one owner of its schedule:
//! the [`policy`] decides per pass and per layer what is offloaded, kept or checkpointed and in
//! which order inputs come back; the [`scheduler`] carries that out over a reusable pinned host
//! pool ([`pool`]) and a transport ([`transport`]: plain `memcpy`, for tests and benches without
//! a GPU; [`cuda`]: async copies on our own stream, ordered against PyTorch's stream by events).
//!
//! Nothing here knows Python. The Python side marks layer boundaries and hands tensors over as
//! opaque leases; the scheduler keeps each lease (so PyTorch's caching allocator cannot reuse the
//! memory) until the compute stream has waited for the copy that touches it, and keeps the host
//! pool from reusing a block the same way.

pub mod cuda;
pub mod policy;
pub mod pool;
pub mod scheduler;
pub mod transport;

pub use cuda::{CudaEvent, CudaTransport};
pub use policy::{BudgetStats, LayerPlan, Policy, PolicyConfig, SaveMode, Tag, MIN_PARKED_BYTES};
pub use pool::{size_class, Block, HostPool, PoolStats, MAX_REQUEST};
pub use scheduler::{Action, HandleState, Scheduler, SchedulerStats};
pub use transport::{HostTransport, Transport, HOST_ALIGN};
