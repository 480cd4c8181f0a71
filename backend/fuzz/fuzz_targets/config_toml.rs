//! cargo-fuzz target: the body is `sluice::fuzzing::config_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::config_toml(data));
