//! cargo-fuzz target: the body is `sluice::fuzzing::monitor_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::monitor_request(data));
