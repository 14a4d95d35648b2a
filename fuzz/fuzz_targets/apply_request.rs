//! See `chaos_agent::fuzzing::apply` for the properties; a stable test replays `fuzz/corpus/apply_request`.
//! Run: `cd fuzz && cargo +nightly fuzz run apply_request corpus/apply_request`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chaos_agent::fuzzing::apply(data));
