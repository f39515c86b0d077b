//! CUDA graphs of decode steps (vLLM's CUDA-graph runner): the bucket sizes a decode batch and
//! its longest context are padded to, the captured graphs keyed by shape, and the replay-or-capture
//! decision of one step. Invariant: a graph is replayed only for the shape, buffers and KV addresses
//! it was captured with; any difference runs the step eagerly and captures it again.

use std::collections::HashMap;

use vkv_kernels::cuda::cudarc::driver::CudaGraph;
use vkv_kernels::cuda::{driver, KvAddress};

use super::{CudaLlama, CudaModelError, Result, StepBuffers, StepShape};

impl CudaLlama {
    /// Replay the graph captured for `key` if it was captured for this shape and still points at
    /// these buffers and KV addresses. Otherwise run the step kernel by kernel — which also makes
    /// cuBLASLt's plans for its shapes before anything is captured — and capture it for the next
    /// step of this shape; a capture that fails turns graphs off (with a message) and leaves the
    /// eager step's result.
    pub(super) fn graph_step(
        &self,
        graphs: &mut DecodeGraphs,
        key: (usize, usize),
        shape: &StepShape,
        bufs: &StepBuffers,
        addrs: &[KvAddress],
    ) -> Result<()> {
        use vkv_kernels::cuda::cudarc::driver::sys::{
            CUgraphInstantiate_flags, CUstreamCaptureMode,
        };
        if let Some(g) = graphs.steps.get(&key) {
            if g.shape == *shape && g.buffers == *bufs && g.kv == addrs {
                g.graph.0.launch().map_err(driver("cuGraphLaunch"))?;
                graphs.replays += 1;
                return Ok(());
            }
        }
        self.queue_step(shape, bufs, addrs, true)?;
        let captured = (|| -> Result<CudaGraph> {
            // Relaxed: the Mapper thread keeps mapping pages (cuMemMap) while this one captures.
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(driver("cuStreamBeginCapture"))?;
            let queued = self.queue_step(shape, bufs, addrs, true);
            let graph = self
                .stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(driver("cuStreamEndCapture"));
            queued?;
            let graph =
                graph?.ok_or_else(|| CudaModelError::Batch("an empty capture".to_string()))?;
            graph.upload().map_err(driver("cuGraphUpload"))?;
            Ok(graph)
        })();
        match captured {
            Ok(graph) => {
                if graphs.steps.len() >= MAX_GRAPHS {
                    graphs.steps.clear();
                }
                graphs.steps.insert(
                    key,
                    CapturedStep {
                        graph: StepGraph(graph),
                        shape: *shape,
                        buffers: *bufs,
                        kv: addrs.to_vec(),
                    },
                );
                graphs.captures += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "capturing a decode step as a CUDA graph failed: graphs off");
                graphs.max_batch = 0;
                graphs.steps.clear();
            }
        }
        Ok(())
    }
}

/// Decode batches are padded up to one of these sizes for their graphs (vLLM's capture sizes:
/// 1, 2, 4, then multiples of 8).
pub(super) fn batch_bucket(n: usize) -> usize {
    match n {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => n.next_multiple_of(8),
    }
}

/// ... and their longest context up to a multiple of a quarter of its next power of two, at
/// least 512: at most four graphs per doubling of the context, planned for at most half again the
/// longest sequence (the decode kernel stops at each sequence's own length; splits beyond it do
/// nothing).
pub(super) fn context_bucket(n: usize) -> usize {
    n.max(1)
        .next_multiple_of((n.max(1).next_power_of_two() / 4).max(512))
}

/// Decode batches of up to this many sequences run as graphs (vLLM's largest capture size).
pub(super) const MAX_GRAPH_BATCH: usize = 512;

/// Graphs kept at most; past that they are all dropped and captured again as they recur.
const MAX_GRAPHS: usize = 512;

/// CUDA graphs of decode steps (vLLM's CUDA-graph runner): a step's ~11 launches per layer cost
/// the host about as much as a small batch's kernels take on the device, so a decode step whose
/// shape was seen before is replayed from one graph launch. The shape is fixed per graph: the
/// batch is padded up to [`batch_bucket`] rows, the longest context up to [`context_bucket`]
/// (which fixes the decode kernel's splits and the paged table's width), and inputs are uploaded
/// into the same buffers every step. A graph remembers the buffer and KV addresses it was
/// captured with and is captured again when any moved (a buffer grew).
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    /// Graphs in use (`vkv serve --enforce-eager` turns them off).
    pub(super) on: bool,
    /// Decode batches of more sequences run kernel by kernel (0: graphs off after a failure).
    pub(super) max_batch: usize,
    pub(super) steps: HashMap<(usize, usize), CapturedStep>,
    pub(super) captures: u64,
    pub(super) replays: u64,
}

/// A captured step and what it baked in: replayed only while all of it still holds.
pub(super) struct CapturedStep {
    pub(super) graph: StepGraph,
    pub(super) shape: StepShape,
    pub(super) buffers: StepBuffers,
    pub(super) kv: Vec<KvAddress>,
}

/// A captured step. cudarc's `CudaGraph` holds raw driver handles and so is not `Send`.
pub(super) struct StepGraph(CudaGraph);
// SAFETY: the graph is owned by its `CudaLlama` and used only through it, from the one thread that
// holds the model at a time, with the model's context current (as its stream is).
unsafe impl Send for StepGraph {}

/// How often decode steps were captured and replayed (see [`DecodeGraphs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Decode steps run as graphs (off: `--enforce-eager`, or after a failed capture).
    pub on: bool,
    pub captures: u64,
    pub replays: u64,
    /// Graphs held now.
    pub graphs: usize,
}
