//! Python bindings of `crate::offload`: one class, `OffloadScheduler`, over the host or the CUDA
//! transport. The layer schedule takes tensors (held as leases until the compute stream has
//! waited for the copy that touches them; dropped here, with the GIL, never under the lock); the
//! raw methods take pointers and streams as plain integers (`Tensor.data_ptr()`,
//! `torch.cuda.current_stream().cuda_stream`) and own nothing.

use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::guard;
use crate::cuda::RawStream;
use crate::offload::{
    Action, CudaTransport, HandleState, HostTransport, LayerPlan, PolicyConfig, SaveMode,
    Scheduler, SchedulerStats,
};
use crate::{Error, Result};

/// What it takes to allocate a prefetch destination: the offloaded tensor's shape, strides and
/// dtype name.
#[derive(Clone, Debug, Default)]
struct Meta {
    shape: Vec<i64>,
    stride: Vec<i64>,
    dtype: String,
}

/// Whether `shape`/`stride` cover exactly `numel` elements with no gap or overlap (contiguous up
/// to a permutation of the dimensions), so the tensor's bytes are one range from its address.
fn dense(shape: &[i64], stride: &[i64]) -> bool {
    if shape.len() != stride.len() || shape.iter().any(|&n| n < 0) {
        return false;
    }
    let mut dims: Vec<(i64, i64)> = shape
        .iter()
        .copied()
        .zip(stride.iter().copied())
        .filter(|&(n, _)| n != 1)
        .collect();
    if dims.iter().any(|&(n, _)| n == 0) {
        return true;
    }
    dims.sort_by_key(|&(_, st)| st);
    let mut expected = 1i64;
    for (n, st) in dims {
        if st != expected {
            return false;
        }
        expected = match expected.checked_mul(n) {
            Some(e) => e,
            None => return false,
        };
    }
    true
}

type Lease = Py<PyAny>;

enum Inner {
    Host(Scheduler<HostTransport, Lease, Meta>),
    Cuda(Scheduler<CudaTransport, Lease, Meta>),
}

/// Run the same expression on whichever scheduler `inner` holds.
macro_rules! each {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Host($s) => $body,
            Inner::Cuda($s) => $body,
        }
    };
}

/// OffloadScheduler(device=None, lookahead=1, host_cap_bytes=None, *, min_tokens=0,
///                  last_layer=None, budget_bytes=None)
///
/// Moves activations between device memory and a reusable host-memory pool, and decides the
/// offload schedule of a training step.
///
/// Args:
///     device: CUDA device index; copies run on a non-blocking stream of our own, ordered after
///         the caller's stream by events. ``None`` selects the host transport (plain ``memcpy``
///         between CPU addresses), used on machines without a GPU.
///     lookahead: how many earlier layers' inputs are copied back ahead of the layer that
///         recomputes in backward.
///     host_cap_bytes: upper bound on the host bytes the pool may reserve; reaching it raises
///         ``HostMemoryError``, a ``MemoryError`` (never blocks on something that cannot finish).
///     min_tokens: layer calls with fewer tokens keep their input on the device.
///     last_layer: index of the last layer run; its input stays on the device.
///     budget_bytes: device bytes for activations kept without recompute (whole layers, then
///         single saved tensors, in forward order, as measured by :meth:`record_layer_cost`).
///     save: ``"never"``, ``"auto"`` or ``"always"``: when a layer may skip its recompute by
///         parking its saved tensors on the host (:meth:`pack_tensor`); ``"auto"`` when the bytes
///         the budget cannot hold cross the link within the layer's measured forward time.
///     link_bytes_per_s: the measured device-to-host bandwidth ``"auto"`` decides with.
///     min_parked_bytes: saved tensors smaller than this stay on the device (default 64 KiB).
///
/// The layer schedule: :meth:`begin_layer` (forward, each layer) -> :meth:`offload_layer` ->
/// :meth:`fetch_layer` (backward, each layer) -> :meth:`release`. Raw handles:
/// :meth:`offload` -> :meth:`prefetch` -> :meth:`wait` -> :meth:`release`.
/// Methods may be called from any thread (autograd runs backward on its own thread).
#[pyclass(name = "OffloadScheduler", module = "rslora_fast._core")]
pub(crate) struct PyOffloadScheduler {
    inner: Mutex<Inner>,
    device: Option<i32>,
    copy_stream: usize,
    lookahead: usize,
}

impl PyOffloadScheduler {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Offload("scheduler lock poisoned by an earlier panic".into()))
    }

    /// Run `f` on the scheduler without the GIL; the leases it let go are dropped afterwards,
    /// with the GIL and outside the lock (a dropped tensor may run Python finalizers).
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner) -> Result<R> + Send,
    ) -> PyResult<R> {
        let (out, freed) = py.detach(|| {
            let mut g = match self.lock() {
                Ok(g) => g,
                Err(e) => return (Err(e), Vec::new()),
            };
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut g)))
                .unwrap_or_else(|_| Err(Error::Offload("internal error (bug): panic".into())));
            let freed = each!(&mut *g, s => s.take_freed());
            (out, freed)
        });
        drop(freed);
        out.map_err(Into::into)
    }

    fn device_name(&self) -> String {
        match self.device {
            Some(d) => format!("cuda:{d}"),
            None => "cpu".into(),
        }
    }

    /// Address, byte size and description of a contiguous tensor on our device.
    fn tensor_parts(&self, t: &Bound<'_, PyAny>) -> PyResult<(usize, usize, Meta)> {
        let tensor = t.py().import("torch")?.getattr("Tensor")?;
        if !t.is_instance(&tensor)? {
            return Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {}",
                t.get_type().name()?
            )));
        }
        let device = t.getattr("device")?;
        let kind: String = device.getattr("type")?.extract()?;
        let index: Option<i32> = device.getattr("index")?.extract()?;
        let ours = match self.device {
            None => kind == "cpu",
            Some(d) => kind == "cuda" && index.unwrap_or(d) == d,
        };
        if !ours {
            return Err(Error::invalid(format!(
                "a tensor on {} cannot go through the {} scheduler",
                device.str()?,
                self.device_name()
            ))
            .into());
        }
        let shape: Vec<i64> = t.getattr("shape")?.extract()?;
        let stride: Vec<i64> = t.call_method0("stride")?.extract()?;
        if !dense(&shape, &stride) {
            return Err(Error::invalid(format!(
                "a tensor of shape {shape:?} and strides {stride:?} has gaps or overlaps; only dense \
                 tensors (contiguous up to a permutation of dimensions) can be offloaded"
            ))
            .into());
        }
        let numel: usize = t.call_method0("numel")?.extract()?;
        let item: usize = t.call_method0("element_size")?.extract()?;
        let nbytes = numel
            .checked_mul(item)
            .ok_or_else(|| Error::invalid("tensor size overflows"))?;
        let ptr: usize = t.call_method0("data_ptr")?.extract()?;
        let dtype: String = t.getattr("dtype")?.str()?.extract()?;
        let dtype = dtype.trim_start_matches("torch.").to_string();
        Ok((
            ptr,
            nbytes,
            Meta {
                shape,
                stride,
                dtype,
            },
        ))
    }

    /// A fresh tensor of `meta`'s shape and dtype on our device, checked to hold `nbytes`.
    fn allocate(&self, py: Python<'_>, meta: &Meta, nbytes: usize) -> PyResult<(usize, Lease)> {
        let torch = py.import("torch")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("dtype", torch.getattr(meta.dtype.as_str())?)?;
        kwargs.set_item("device", self.device_name())?;
        let args = (
            PyTuple::new(py, &meta.shape)?,
            PyTuple::new(py, &meta.stride)?,
        );
        let t = torch.call_method("empty_strided", args, Some(&kwargs))?;
        let (ptr, got, _) = self.tensor_parts(&t)?;
        if got != nbytes {
            return Err(Error::Offload(format!(
                "a prefetch buffer of {got} bytes cannot hold {nbytes} offloaded bytes"
            ))
            .into());
        }
        Ok((ptr, t.unbind()))
    }
}

fn plan_name(p: LayerPlan) -> &'static str {
    p.name()
}

fn action_parts(a: &Action) -> (&'static str, u64, usize) {
    match *a {
        Action::Offload(t) => ("offload", t.pass, t.layer),
        Action::Prefetch(t) => ("prefetch", t.pass, t.layer),
        Action::Ready(t) => ("ready", t.pass, t.layer),
    }
}

fn state_name(s: HandleState) -> &'static str {
    match s {
        HandleState::Offloaded => "offloaded",
        HandleState::Prefetched => "prefetched",
        HandleState::Ready => "ready",
    }
}

#[pymethods]
impl PyOffloadScheduler {
    #[new]
    #[pyo3(signature = (device=None, lookahead=1, host_cap_bytes=None, *, min_tokens=0,
                        last_layer=None, budget_bytes=None, save="never", link_bytes_per_s=None,
                        min_parked_bytes=None))]
    #[allow(clippy::too_many_arguments)] // Python keywords, each with a default
    fn new(
        device: Option<i32>,
        lookahead: usize,
        host_cap_bytes: Option<usize>,
        min_tokens: usize,
        last_layer: Option<usize>,
        budget_bytes: Option<u64>,
        save: &str,
        link_bytes_per_s: Option<f64>,
        min_parked_bytes: Option<usize>,
    ) -> PyResult<Self> {
        guard(|| {
            let save = match save {
                "never" => SaveMode::Never,
                "auto" => SaveMode::Auto,
                "always" => SaveMode::Always,
                other => {
                    return Err(Error::invalid(format!(
                        "save must be \"never\", \"auto\" or \"always\", got {other:?}"
                    )))
                }
            };
            let cfg = PolicyConfig {
                lookahead,
                min_tokens,
                last_layer,
                budget_bytes,
                save,
                link_bytes_per_s,
                min_parked_bytes,
            };
            let inner = match device {
                None => Inner::Host(Scheduler::with_policy(
                    HostTransport::new(),
                    cfg,
                    host_cap_bytes,
                )),
                Some(d) => Inner::Cuda(Scheduler::with_policy(
                    CudaTransport::new(d)?,
                    cfg,
                    host_cap_bytes,
                )),
            };
            let copy_stream = each!(&inner, s => s.copy_stream());
            Ok(PyOffloadScheduler {
                inner: Mutex::new(inner),
                device,
                copy_stream,
                lookahead,
            })
        })
    }

    /// The CUDA device index, or ``None`` for the host transport.
    #[getter]
    fn device(&self) -> Option<i32> {
        self.device
    }

    /// Our copy stream as an integer (``0`` for the host transport), for profiling and tests:
    /// the layer schedule keeps the tensors a copy touches alive itself (no ``record_stream``).
    #[getter]
    fn copy_stream(&self) -> usize {
        self.copy_stream
    }

    /// The prefetch depth given at construction.
    #[getter]
    fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// offload(src_ptr, nbytes, stream=0) -> int
    ///
    /// Copy ``nbytes`` at ``src_ptr`` to a host block after the work queued so far on
    /// ``stream``; returns the handle. The source must stay alive and unchanged until ``stream``
    /// has waited for the copy (:meth:`wait`).
    #[pyo3(signature = (src_ptr, nbytes, stream=0))]
    fn offload(
        &self,
        py: Python<'_>,
        src_ptr: usize,
        nbytes: usize,
        stream: usize,
    ) -> PyResult<u64> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                // SAFETY: the Python caller passes the data_ptr of a live contiguous tensor of
                // `nbytes` bytes on our device, kept alive until `stream` waits for the copy.
                each!(&mut *g, s => unsafe { s.offload(src_ptr, nbytes, RawStream(stream)) })
            })
        })
    }

    /// prefetch(handle, dst_ptr, stream=0) -> None
    ///
    /// Start copying a handle's bytes back into ``dst_ptr`` (a buffer of at least
    /// ``nbytes(handle)`` bytes the caller allocated), after the work queued so far on ``stream``.
    #[pyo3(signature = (handle, dst_ptr, stream=0))]
    fn prefetch(&self, py: Python<'_>, handle: u64, dst_ptr: usize, stream: usize) -> PyResult<()> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                // SAFETY: the Python caller passes the data_ptr of a fresh tensor of
                // nbytes(handle) bytes on our device, kept alive until `stream` waits for it.
                each!(&mut *g, s => unsafe { s.prefetch(handle, dst_ptr, RawStream(stream)) })
            })
        })
    }

    /// wait(handle, stream=0) -> None
    ///
    /// Make ``stream`` wait for the handle's copy back (no host synchronization); afterwards the
    /// prefetch destination may be read on ``stream``.
    #[pyo3(signature = (handle, stream=0))]
    fn wait(&self, py: Python<'_>, handle: u64, stream: usize) -> PyResult<()> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                each!(&mut *g, s => s.wait(handle, RawStream(stream)))
            })
        })
    }

    /// release(handle) -> None
    ///
    /// Return a handle's host block to the pool (reused only once its copies have finished).
    /// Raises ``OffloadError`` for an unknown or already released handle.
    fn release(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        self.with(py, |g| each!(g, s => s.release(handle)))
    }

    /// release_all() -> int
    ///
    /// Release every live handle (error recovery); returns how many there were.
    fn release_all(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |g| each!(g, s => s.release_all()))
    }

    /// begin_layer(layer, tokens, offloadable=True) -> tuple[int, str]
    ///
    /// Forward reaches decoder layer ``layer`` with ``tokens`` tokens (batch x sequence): the pass
    /// it belongs to and the plan, one of ``"keep"`` (no checkpoint: it fits the memory budget),
    /// ``"offload"`` (checkpoint, input to the host through :meth:`offload_layer`), ``"last"``,
    /// ``"short"`` (fewer than ``min_tokens``) or ``"unsupported"`` (``offloadable`` false):
    /// checkpoint with the input kept on the device. A layer index that does not grow starts a
    /// new pass.
    #[pyo3(signature = (layer, tokens, offloadable=true))]
    fn begin_layer(
        &self,
        py: Python<'_>,
        layer: usize,
        tokens: usize,
        offloadable: bool,
    ) -> PyResult<(u64, &'static str)> {
        let (pass, plan) = self.with(
            py,
            |g| each!(g, s => s.begin_layer(layer, tokens, offloadable)),
        )?;
        Ok((pass, plan_name(plan)))
    }

    /// offload_layer(layer, tensor, stream=0) -> int
    ///
    /// Park ``tensor`` (contiguous, on our device), the input of ``layer`` in the pass in
    /// progress, in host memory; returns its handle. The scheduler keeps ``tensor`` alive until
    /// ``stream`` has waited for the copy (one layer later).
    #[pyo3(signature = (layer, tensor, stream=0))]
    fn offload_layer(
        &self,
        py: Python<'_>,
        layer: usize,
        tensor: Bound<'_, PyAny>,
        stream: usize,
    ) -> PyResult<u64> {
        let (ptr, nbytes, meta) = self.tensor_parts(&tensor)?;
        let lease = tensor.unbind();
        self.with(py, move |g| {
            // SAFETY: `ptr` is the data of a live contiguous tensor of `nbytes` bytes on our
            // device; the lease keeps it alive until `stream` has waited for the copy.
            each!(g, s => unsafe {
                s.offload_layer(layer, ptr, nbytes, RawStream(stream), lease, meta)
            })
        })
    }

    /// pack_tensor(layer, tensor, stream=0) -> int | None
    ///
    /// A tensor saved for backward by ``layer`` (planned ``"save"``): ``None`` when the policy
    /// keeps it on the device, else the handle of its copy on the host (held like
    /// :meth:`offload_layer`; :meth:`fetch_layer` brings it back).
    #[pyo3(signature = (layer, tensor, stream=0))]
    fn pack_tensor(
        &self,
        py: Python<'_>,
        layer: usize,
        tensor: Bound<'_, PyAny>,
        stream: usize,
    ) -> PyResult<Option<u64>> {
        let (ptr, nbytes, meta) = self.tensor_parts(&tensor)?;
        let lease = tensor.unbind();
        self.with(py, move |g| {
            // SAFETY: as in `offload_layer`.
            each!(g, s => unsafe {
                s.pack_layer(layer, ptr, nbytes, RawStream(stream), lease, meta)
            })
        })
    }

    /// fetch_layer(pass_, layer, handle=None, stream=0) -> Tensor | None
    ///
    /// Backward reaches ``layer`` of pass ``pass_``: start copying back what the policy names
    /// (the ``lookahead`` nearest earlier layers of the pass), then, when ``handle`` (this layer's
    /// input) is given, return it on the device, ordered before later work on ``stream``.
    #[pyo3(signature = (pass_, layer, handle=None, stream=0))]
    fn fetch_layer(
        &self,
        py: Python<'_>,
        pass_: u64,
        layer: usize,
        handle: Option<u64>,
        stream: usize,
    ) -> PyResult<Option<Py<PyAny>>> {
        let plan = self.with(py, |g| {
            Ok(each!(g, s => s.backward_plan(pass_, layer, handle)))
        })?;
        for (id, nbytes, meta) in plan {
            let (dst, lease) = self.allocate(py, &meta, nbytes)?;
            self.with(py, move |g| {
                // SAFETY: `dst` is a fresh tensor of exactly `nbytes` bytes on our device; the
                // lease keeps it alive until `stream` waits for the copy.
                each!(g, s => unsafe { s.prefetch_leased(id, dst, RawStream(stream), lease) })
            })?;
        }
        let Some(h) = handle else { return Ok(None) };
        match self.with(py, |g| each!(g, s => s.take_ready(h, RawStream(stream))))? {
            Some(t) => Ok(Some(t)),
            None => Err(Error::Offload(format!(
                "handle {h} was fetched already (backward through an offloaded checkpoint twice, \
                 e.g. retain_graph=True, is not supported)"
            ))
            .into()),
        }
    }

    /// wants_measure(layer) -> bool
    ///
    /// Whether ``layer``'s saved bytes should be measured on its next recompute (budget mode).
    fn wants_measure(&self, layer: usize) -> PyResult<bool> {
        guard(|| Ok(each!(&*self.lock()?, s => s.wants_measure(layer))))
    }

    /// record_layer_cost(layer, nbytes, seconds, tokens) -> None
    ///
    /// ``layer``'s measured costs: the bytes its forward saved for backward and the seconds the
    /// forward took, at ``tokens`` tokens (what the budget and ``save="auto"`` decide with).
    fn record_layer_cost(
        &self,
        layer: usize,
        nbytes: u64,
        seconds: f64,
        tokens: usize,
    ) -> PyResult<()> {
        guard(|| {
            each!(&mut *self.lock()?, s => s.record_layer_cost(layer, nbytes, seconds, tokens));
            Ok(())
        })
    }

    /// set_budget(budget_bytes) -> None
    ///
    /// Change the device budget (from the next pass on), e.g. once ``max_memory_gb="auto"``
    /// has read the device's free memory.
    fn set_budget(&self, budget_bytes: Option<u64>) -> PyResult<()> {
        guard(|| {
            each!(&mut *self.lock()?, s => s.set_budget(budget_bytes));
            Ok(())
        })
    }

    /// budget_stats() -> dict
    ///
    /// The latest pass: ``budget_bytes``, ``kept_layers`` (no recompute, all saved on the
    /// device), ``kept_bytes`` (activation bytes kept on the device without recompute),
    /// ``saved_layers`` (no recompute, saved tensors kept or parked one by one),
    /// ``recomputed_layers``, ``tensors_kept``, ``tensors_parked``, ``parked_bytes`` (bytes sent
    /// to the host; each comes back once).
    fn budget_stats(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let st = guard(|| Ok(each!(&*self.lock()?, s => s.budget_stats())))?;
        let d = PyDict::new(py);
        d.set_item("budget_bytes", st.budget_bytes)?;
        d.set_item("kept_layers", st.kept_layers)?;
        d.set_item("kept_bytes", st.kept_bytes)?;
        d.set_item("saved_layers", st.saved_layers)?;
        d.set_item("recomputed_layers", st.recomputed_layers)?;
        d.set_item("tensors_kept", st.tensors_kept)?;
        d.set_item("tensors_parked", st.tensors_parked)?;
        d.set_item("parked_bytes", st.parked_bytes)?;
        Ok(d.unbind())
    }

    /// set_trace(on) -> None
    ///
    /// Start (clearing the record) or stop recording the schedule's actions.
    fn set_trace(&self, on: bool) -> PyResult<()> {
        guard(|| {
            each!(&mut *self.lock()?, s => s.set_trace(on));
            Ok(())
        })
    }

    /// trace() -> list[tuple[str, int, int]]
    ///
    /// The recorded actions, in order: ``(kind, pass, layer)`` with kind ``"offload"``,
    /// ``"prefetch"`` (copy back started) or ``"ready"`` (the layer may read it).
    fn trace(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        let acts: Vec<(&'static str, u64, usize)> =
            guard(|| Ok(each!(&*self.lock()?, s => s.trace().iter().map(action_parts).collect())))?;
        Ok(PyList::new(py, acts)?.unbind())
    }

    /// nbytes(handle) -> int
    ///
    /// Size of a live handle's data.
    fn nbytes(&self, handle: u64) -> PyResult<usize> {
        guard(|| each!(&*self.lock()?, s => s.nbytes(handle)))
    }

    /// state(handle) -> str
    ///
    /// ``"offloaded"``, ``"prefetched"`` or ``"ready"``.
    fn state(&self, handle: u64) -> PyResult<&'static str> {
        guard(|| each!(&*self.lock()?, s => s.state(handle)).map(state_name))
    }

    /// take_warning() -> str | None
    ///
    /// The pageable-memory fallback warning, returned once after pinning first failed.
    fn take_warning(&self) -> PyResult<Option<String>> {
        guard(|| Ok(each!(&mut *self.lock()?, s => s.take_warning())))
    }

    /// trim() -> None
    ///
    /// Wait for copies in flight and free every idle host block (live handles keep theirs).
    fn trim(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| guard(|| each!(&mut *self.lock()?, s => s.trim())))
    }

    /// stats() -> dict
    ///
    /// Counters: ``pinned_bytes``, ``pageable_bytes``, ``reserved_bytes``, ``in_use_bytes``,
    /// ``peak_in_use_bytes``, ``pending_blocks``, ``allocations``, ``pageable_fallbacks``,
    /// ``cap_bytes``, ``live_handles``, ``offloads``, ``prefetches``, ``bytes_to_host``,
    /// ``bytes_to_device``.
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let st: SchedulerStats = guard(|| Ok(each!(&*self.lock()?, s => s.stats())))?;
        let d = PyDict::new(py);
        let p = &st.pool;
        d.set_item("pinned_bytes", p.pinned_bytes)?;
        d.set_item("pageable_bytes", p.pageable_bytes)?;
        d.set_item("reserved_bytes", p.pinned_bytes + p.pageable_bytes)?;
        d.set_item("in_use_bytes", p.in_use_bytes)?;
        d.set_item("peak_in_use_bytes", p.peak_in_use_bytes)?;
        d.set_item("pending_blocks", p.pending_blocks)?;
        d.set_item("allocations", p.allocations)?;
        d.set_item("pageable_fallbacks", p.pageable_fallbacks)?;
        d.set_item("cap_bytes", p.cap_bytes)?;
        d.set_item("live_handles", st.live_handles)?;
        d.set_item("offloads", st.offloads)?;
        d.set_item("prefetches", st.prefetches)?;
        d.set_item("bytes_to_host", st.bytes_to_host)?;
        d.set_item("bytes_to_device", st.bytes_to_device)?;
        Ok(d.unbind())
    }

    fn __repr__(&self) -> String {
        let dev = match self.device {
            Some(d) => format!("cuda:{d}"),
            None => "host".into(),
        };
        format!(
            "OffloadScheduler(device={dev}, lookahead={})",
            self.lookahead
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyOffloadScheduler>()?;
    Ok(())
}
