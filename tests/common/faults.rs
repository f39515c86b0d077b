//! Faults injected into a running engine ([`vkv_vmm::faults`]), the scenarios shared by the CPU
//! tests (tests/faults.rs) and the GPU ones (tests/gpu_faults.rs). Each checks that the fault
//! ends the requests it touches with a clear error (or preempts them), that the others finish,
//! that the engine serves the next request, and that no KV memory is left behind.
//!
//! The fault plan is process-wide: callers hold [`lock`] for the whole scenario.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use vkv_engine::engine::{event_channel, Engine, FinishReason};
use vkv_vmm::faults::{plan, Fault};

use super::serving::{assert_empty, collect_calling, greedy, prompts, run_one, wait_for, Output};

static FAULTS: Mutex<()> = Mutex::new(());

/// The process's fault plan to ourselves, disarmed.
pub fn lock() -> MutexGuard<'static, ()> {
    let guard = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    plan().disarm();
    guard
}

/// Run `n` greedy requests of `max_tokens` at once, calling `during` once the first event has
/// arrived; returns their outputs in submission order.
fn run_batch(e: &Engine, n: usize, max_tokens: usize, during: impl FnOnce()) -> Vec<Output> {
    let (tx, mut rx) = event_channel();
    let ids: Vec<_> = prompts(e, n)
        .into_iter()
        .map(|p| e.submit(greedy(p, max_tokens), tx.clone()).unwrap())
        .collect();
    drop(tx);
    let mut out = collect_calling(&mut rx, n, during);
    ids.iter().map(|id| out.remove(id).unwrap()).collect()
}

fn ran_to_length(o: &Output, max_tokens: usize) -> bool {
    o.finished
        .as_ref()
        .is_some_and(|f| f.reason == FinishReason::Length && o.tokens.len() == max_tokens)
}

/// The engine serves a request after the fault, and holds no KV memory once all are done.
fn assert_recovered(e: &Engine, name: &str) {
    let p = prompts(e, 1).remove(0);
    let after = run_one(e, greedy(p, 8));
    assert!(
        ran_to_length(&after, 8),
        "{name}: the next request: {after:?}"
    );
    wait_for(e, "no request running", |m| {
        m.running == 0 && m.waiting == 0
    });
    assert_empty(e, name);
}

/// A forward pass that fails to launch ends the requests of that batch with "forward pass
/// failed: injected fault ..."; the rest, and the next request, run.
pub fn launch_failure(e: &Engine, name: &str) {
    step_fault(e, name, Fault::Launch, "forward pass failed");
}

/// A step that panics (a bug) ends the requests in flight with "internal error in the engine
/// step: injected fault ..." instead of stopping the engine; the next request runs.
pub fn step_panic(e: &Engine, name: &str) {
    step_fault(
        e,
        name,
        Fault::StepPanic,
        "internal error in the engine step",
    );
}

/// Arm `fault` once while 4 requests run: some fail with `message`, the others run to length.
fn step_fault(e: &Engine, name: &str, fault: Fault, message: &str) {
    let injected = plan().injected(fault);
    let outs = run_batch(e, 4, 24, || plan().arm(fault, 1));
    assert_eq!(plan().injected(fault), injected + 1, "{name}");
    let failed: Vec<&String> = outs.iter().filter_map(|o| o.failed.as_ref()).collect();
    assert!(!failed.is_empty(), "{name}: no request failed: {outs:?}");
    for o in &outs {
        match &o.failed {
            Some(why) => assert!(
                why.contains(message) && why.contains("injected fault"),
                "{name}: {why}"
            ),
            None => assert!(ran_to_length(o, 24), "{name}: {o:?}"),
        }
    }
    assert_recovered(e, name);
}

/// vmm: a Mapper thread that dies (a panic in a driver call) fails no request — `reserve` maps
/// what each step needs — and is started again (`mapper_restarts`). `expected`: the outputs of
/// the same `n` requests without the fault, where the device promises the same tokens.
pub fn mapper_death(e: &Engine, name: &str, n: usize, expected: Option<&[Vec<u32>]>) {
    let injected = plan().injected(Fault::MapperPanic);
    plan().arm(Fault::MapperPanic, 1);
    let outs = run_batch(e, n, 24, || {});
    assert_eq!(plan().injected(Fault::MapperPanic), injected + 1, "{name}");
    for (i, o) in outs.iter().enumerate() {
        assert!(ran_to_length(o, 24), "{name}: {o:?}");
        if let Some(want) = expected {
            assert_eq!(o.tokens, want[i], "{name}: the output changed");
        }
    }
    wait_for(e, "the Mapper thread started again", |m| {
        m.map.as_ref().is_some_and(|m| m.mapper_restarts >= 1)
    });
    assert_recovered(e, name);
}

/// The outputs of `n` greedy requests of 24 tokens run together, no fault armed.
pub fn reference(e: &Engine, n: usize) -> Vec<Vec<u32>> {
    run_batch(e, n, 24, || {})
        .into_iter()
        .map(|o| {
            assert!(ran_to_length(&o, 24), "{o:?}");
            o.tokens
        })
        .collect()
}

/// vmm, on an engine started with [`Fault::Map`] armed without end (no page can be mapped):
/// every request fails at admission with the driver's error; disarmed, every one runs.
pub fn map_failure(e: &Engine, name: &str) {
    let outs = run_batch(e, 3, 8, || {});
    for o in &outs {
        let why = o
            .failed
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: {o:?}"));
        assert!(
            why.contains("reserving KV memory") && why.contains("injected fault"),
            "{name}: {why}"
        );
    }
    assert_empty(e, name);
    plan().disarm();
    let outs = run_batch(e, 3, 8, || {});
    assert!(outs.iter().all(|o| ran_to_length(o, 8)), "{name}: {outs:?}");
    assert_recovered(e, name);
}

/// vmm with pages created on demand (the CPU), the device out of memory ([`Fault::CreatePage`]
/// without end): a request that needs new pages with nothing else running fails with "out of
/// device memory"; short ones that fit the pages already made still run; disarmed, the long one
/// runs too.
pub fn device_out_of_memory(e: &Engine, name: &str, long_prompt: Vec<u32>) {
    plan().arm(Fault::CreatePage, usize::MAX);
    let long = run_one(e, greedy(long_prompt.clone(), 4));
    let why = long
        .failed
        .as_deref()
        .unwrap_or_else(|| panic!("{name}: {long:?}"));
    assert!(why.contains("out of device memory"), "{name}: {why}");
    assert_empty(e, name);
    let short = prompts(e, 1).remove(0);
    let ok = run_one(e, greedy(short, 4));
    assert!(ran_to_length(&ok, 4), "{name}: a short request: {ok:?}");
    plan().disarm();
    let long = run_one(e, greedy(long_prompt, 4));
    assert!(ran_to_length(&long, 4), "{name}: disarmed: {long:?}");
    assert_recovered(e, name);
}
