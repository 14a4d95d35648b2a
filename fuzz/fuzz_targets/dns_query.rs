//! The user-space DNS parsing: the reference query matcher (what the datapath is held to) and
//! the `--domain` pattern parser, with the properties of `chaos_agent::dns::check_parsers`.
//! Run: `cd fuzz && cargo +nightly fuzz run dns_query` (a unit test runs the same checks over
//! 200,000 mutated inputs on stable).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chaos_agent::dns::check_parsers(data));
