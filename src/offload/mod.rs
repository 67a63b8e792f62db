//! Activation offload for "unsloth" gradient checkpointing: a reusable pinned host pool
//! ([`pool`]), the scheduler that moves layer inputs to the host and back ([`scheduler`]) and the
//! transports that do the copying ([`transport`]: plain `memcpy`, for tests and benches without a
//! GPU; [`cuda`]: async copies on our own stream, ordered against PyTorch's stream by events).
//!
//! Nothing here knows Python. The Python side (`rslora_fast.offload`) keeps PyTorch's caching
//! allocator from reusing memory a copy still touches (`Tensor.record_stream` on
//! [`Scheduler::copy_stream`]); this side keeps the host pool from doing the same.

pub mod cuda;
pub mod pool;
pub mod scheduler;
pub mod transport;

pub use cuda::{CudaEvent, CudaTransport};
pub use pool::{size_class, Block, HostPool, PoolStats, MAX_REQUEST};
pub use scheduler::{HandleState, Scheduler, SchedulerStats};
pub use transport::{HostTransport, Transport, HOST_ALIGN};
