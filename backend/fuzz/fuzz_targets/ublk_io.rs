//! cargo-fuzz target: the body is `sluice::fuzzing::ublk_io`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::ublk_io(data));
