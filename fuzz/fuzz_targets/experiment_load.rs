//! See `chaos_experiment::fuzzing::load` for the properties; a stable test replays `fuzz/corpus/experiment_load`.
//! Run: `cd fuzz && cargo +nightly fuzz run experiment_load corpus/experiment_load`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chaos_experiment::fuzzing::load(data));
