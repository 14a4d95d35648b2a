//! See `chaosctl::cli::fuzzing::args` for the properties; a stable test replays `fuzz/corpus/cli_args`.
//! Run: `cd fuzz && cargo +nightly fuzz run cli_args corpus/cli_args`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chaosctl::cli::fuzzing::args(data));
