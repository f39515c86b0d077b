//! Faults injected into the engine serving the real SmolLM2 on the CPU ([`vkv_vmm::faults`]; the
//! scenarios are in tests/common/faults.rs, shared with tests/gpu_faults.rs): a forward pass
//! that fails to launch, an engine step that panics, the vmm Mapper thread dying, page maps
//! failing, the device out of memory while pages are created. Each ends the requests it touches with a clear error (or
//! changes nothing), the engine serves on, and no KV memory is left behind.

mod common;

use common::faults;
use vkv_engine::engine::{Engine, EngineConfig};
use vkv_engine::kv::KvMode;
use vkv_kernels::cpu::Activations;
use vkv_vmm::faults::{plan, Fault};

use common::serving::CPU_KV_MODES as MODES;

/// The vmm modes of [`MODES`].
const VMM: [KvMode; 2] = [MODES[1], MODES[2]];

/// SmolLM2 on the CPU, batch invariant (a request's tokens do not depend on what else runs),
/// `kv_memory` bytes of KV and `max_num_seqs` sequences at most.
fn engine(mode: KvMode, kv_memory: usize, max_num_seqs: usize) -> Engine {
    let mut model = common::smollm2();
    model.model.set_activations(Activations::Int8);
    let config = EngineConfig {
        kv_mode: mode,
        kv_memory: Some(kv_memory),
        max_num_seqs,
        max_num_batched_tokens: 512,
        max_model_len: Some(2048),
        batch_invariant: true,
        ..EngineConfig::default()
    };
    Engine::start(model, config).expect("start the engine")
}

#[test]
fn a_forward_pass_that_fails_to_launch_fails_its_batch_and_the_engine_serves_on() {
    let _plan = faults::lock();
    for mode in MODES {
        let e = engine(mode, 64 << 20, 8);
        faults::launch_failure(&e, &format!("{mode:?}"));
    }
}

#[test]
fn a_panicking_engine_step_fails_the_requests_in_flight_and_the_engine_serves_on() {
    let _plan = faults::lock();
    for mode in MODES {
        let e = engine(mode, 64 << 20, 8);
        faults::step_panic(&e, &format!("{mode:?}"));
    }
}

#[test]
fn a_dead_mapper_thread_changes_no_output_and_is_started_again() {
    let _plan = faults::lock();
    for mode in VMM {
        let e = engine(mode, 64 << 20, 8);
        let want = faults::reference(&e, 4);
        faults::mapper_death(&e, &format!("{mode:?}"), 4, Some(&want));
    }
}

#[test]
fn failing_page_maps_fail_the_admissions_and_the_engine_serves_on() {
    let _plan = faults::lock();
    for mode in VMM {
        plan().arm(Fault::Map, usize::MAX);
        let e = engine(mode, 64 << 20, 8);
        faults::map_failure(&e, &format!("{mode:?}"));
    }
}

#[test]
fn a_device_out_of_memory_fails_only_what_cannot_fit_the_pages_made() {
    let _plan = faults::lock();
    for mode in VMM {
        // Two slots: before the first request a quarter of the cache (some 700 tokens) is
        // backed, so a prompt of 2 000 tokens must create pages.
        let e = engine(mode, 64 << 20, 2);
        let long: Vec<u32> = common::serving::prompts(&e, 8)
            .concat()
            .into_iter()
            .cycle()
            .take(2000)
            .collect();
        faults::device_out_of_memory(&e, &format!("{mode:?}"), long);
    }
}
