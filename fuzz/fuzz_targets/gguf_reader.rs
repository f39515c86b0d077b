//! Fuzzes the GGUF reader: any input must parse or fail with an error, never panic, read out of
//! bounds or allocate without bound; every tensor of a file that parses must dequantize or fail.
//! Run: `cd fuzz && cargo fuzz run gguf_reader` (nightly, or `RUSTC_BOOTSTRAP=1` on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkv_engine::weights::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for t in file.tensors() {
            let _ = file.dequantize(&t.name);
        }
        for key in file.metadata().keys() {
            let _ = file.get_string_array(key);
            let _ = file.get_i64_array(key);
        }
    }
});
